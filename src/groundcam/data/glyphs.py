"""Synthetic text lines with one exact box per character, to train and score a tiny OCR model.

Every line is a short word or code (3-6 characters of lowercase letters and digits, no spaces)
drawn in one of the DejaVu fonts that ship with matplotlib, at a random size, left-aligned
(starting 2-10 px from the left edge) and vertically centred give or take 3 px, in a
dark-on-light or light-on-dark colour pair, on a 32 x 128 image. Each character is drawn on its
own at the pen position the font's advance widths give, so its box is measured exactly: the tight
bounding box of that character's rendered ink (pixels at least 1/8 covered). A line is a pure
function of `(split, index, seed)`; the split is part of the random seed, so splits never share
an image.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

import matplotlib
import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = (32, 128)  # (height, width)
ALPHABET = string.ascii_lowercase + string.digits
MIN_CHARS, MAX_CHARS = 3, 6
FONT_SIZES = (14, 22)  # inclusive range of font sizes in pixels
FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_STREAM = 0x6C7970  # keeps these seeds apart from the other synthetic generators' seeds
WORD_PROB = 0.5  # the rest are random codes
MARGIN = 2  # pixels kept free between the ink and the image border
JITTER = (3, 8)  # (vertical, horizontal) position jitter in pixels
INK_LEVEL = 32  # mask value (of 255) from which a pixel counts as ink for the boxes

# Common short English words (3-6 letters), so lines look like text as well as like codes.
WORDS = tuple(
    """
    able acid aged also area army away baby back ball band bank base bath bear beat been beer bell
    belt best bill bird blow blue boat body bone book born both bowl burn busy cake call calm came
    camp card care case cash cast cell chat chip city club coal coat code cold come cook cool cope
    copy core cost crew crop dark data date dawn days dead deal dear debt deep deny desk diet dirt
    dish door down draw drew drop drug dual duke dust duty each earn ease east easy edge else even
    ever exit face fact fail fair fall farm fast fate fear feed feel fell felt file fill film find
    fine fire firm fish five flat flow food foot form fort four free from fuel full fund gain game
    gate gave gear gift girl give glad goal goes gold golf gone good gray grew grey grow gulf hair
    half hall hand hang hard harm have head hear heat held help here hero high hill hire hold
    hole holy home hope host hour huge hung hunt hurt idea inch into iron item jack jane jean john
    join jump jury just keen keep kent kept kick kind king knee knew know lack lady laid lake land
    lane last late lead left less life lift like line link list live load loan lock logo long look
    lord lose loss lost love luck made mail main make male many mark mass meal mean meat meet menu
    mere mile milk mill mind mine miss mode mood moon more most move much must name navy near neck
    need news next nice nine none nose note okay once only onto open oral over pace pack page paid
    pain pair palm park part pass past path peak pick pink pipe plan play plot plug plus poll pool
    poor port post pull pure push race rail rain rank rare rate read real rear rely rent rest rice
    rich ride ring rise risk road rock role roll roof room root rose rule rush safe said sake sale
    salt same sand save seat seed seek seem seen self sell send sent ship shop shot show shut sick
    side sign site size skin slip slow snow soft soil sold sole some song soon sort soul spot star
    stay step stop such suit sure take tale talk tall tank tape task team tech tell tend term test
    text than that them then they thin this thus tide tile time tiny told tone took tool tour town
    tree trip true tune turn twin type unit upon used user vast very vice view vote wage wait wake
    walk wall want ward warm wash wave ways weak wear week well went were west what when whom wide
    wife wild will wind wine wing wire wise wish with wood word wore work yard yeah year your zero
    zone act add age ago aid aim air all and any arm art ask bad bag bar bed bet big bit box boy bus
    but buy can cap car cat cup cut day die dog dry due ear eat egg end era eye fan far fat few fit
    fix fly for fun gap gas get god gun guy hat her him hip his hit hot how ice ill job joy key kid
    lab lap law lay leg let lie lip lot low mad man map may mix mom net new nod nor not now nut odd
    off oil old one our out owe own pan pay pen per pet pie pin pop pot put raw red rid row run sad
    say sea see set she shy sir sit six ski sky son spy sue sun tax tea ten the tie tip toe ton
    too top toy try two use van war way web wet who why win yes yet you about above actor admit
    adopt adult after again agent agree ahead alarm album alive allow alone along alter among anger
    angle angry apart apple apply arena argue arise array aside asset avoid award aware badly basic
    beach begin being below bench birth black blade blame blind block blood board boost brain brand
    bread break brief bring broad brown build buyer cable carry catch cause chain chair chart cheap
    check chest chief child china civil claim class clean clear climb clock close coach coast could
    count court cover crash cream crime cross crowd cycle daily dance death delay depth doubt dozen
    draft drama dream dress drink drive early earth eight empty enemy enjoy enter entry equal error
    event every exact exist extra faith false fault field fifth fifty fight final first floor focus
    force frame fresh front fruit funny ghost giant given glass globe grade grand grant grass great
    green gross group guard guess guest guide happy heart heavy horse hotel house human ideal image
    index inner input issue joint judge knife large laser later laugh layer learn least leave legal
    level light limit local logic loose lower lucky lunch magic major maker march match maybe mayor
    media metal might minor model money month moral motor mount mouse mouth movie music needs never
    night noise north novel nurse occur ocean offer often order other owner paint panel paper party
    peace phase phone photo piano piece pilot pitch place plain plane plant plate point pound power
    press price pride prime print prior prize proof proud prove queen quick quiet quite radio raise
    range rapid ratio reach ready refer right river robot round route royal rural scale scene scope
    score sense serve seven shall shape share sharp sheet shelf shell shift shirt shock shoot short
    sight since sixth skill sleep slide small smart smile smoke solid solve sound south space spare
    speak speed spend sport staff stage stake stand start state steam steel stick still stock stone
    store storm story strip study stuff style sugar suite super sweet table taken taste teach thank
    theme there thick thing think third those three throw tight times title today topic total touch
    tough tower track trade train treat trend trial trust truth twice uncle under union unity until
    upper upset urban usage usual valid value video virus visit vital voice waste watch water wheel
    where which while white whole whose woman world worry would write wrong young youth action
    active actual advice affect afford agency agenda almost always amount animal annual answer anyone
    appeal appear around arrive artist aspect assess assist assume attack attend author autumn
    battle beauty become before behind belief better beyond bishop border bottle bottom branch breath
    bridge bright broken budget burden button camera cancer cannot carbon career castle casual caught
    centre chance change charge choice choose church circle client closed coffee column combat coming
    common corner cotton county couple course create credit crisis custom damage danger dealer debate
    decade decide defeat defend define degree demand depend deputy desert design desire detail device
    dinner direct doctor dollar double driver during easily eating editor effect effort eighth either
    eleven emerge empire enable ending energy engage engine enough ensure entire equity escape estate
    ethnic exceed except excuse expand expect expert export extend extent fabric factor fairly family
    famous farmer father fellow female figure filter finger finish flight flower follow forest forget
    formal format former foster friend future garden gather gender gentle global golden ground growth
    guilty handle happen hardly health heaven height hidden holder honest impact import income indeed
    injury inside intend invest island itself jacket junior labour latest latter launch lawyer
    leader league length lesson letter likely linear liquid listen little living losing lovely mainly
    manage manner margin market master matter medium member memory mental merely method middle minute
    mirror mobile modern modest moment mostly mother motion moving museum mutual myself narrow
    nation nature nearby nearly nobody normal notice notion number object obtain office online option
    orange origin output parent partly people period permit person phrase planet player please plenty
    pocket police policy prefer pretty prince prison profit proper public punish purple pursue racing
    random rarely rather rating reader really reason recall recent record reduce reform regard regime
    region relate relief remain remote remove repair repeat report rescue resort result retail retain
    return reveal review reward riding rising robust ruling safety salary sample saving scheme school
    screen script search season second secret sector secure select seller senior series server settle
    severe shadow should silver simple simply singer single sister slight smooth soccer social
    source speech spirit spread spring square stable status steady strain stream street stress strict
    strike string strong studio submit sudden suffer summer summit supply surely survey switch symbol
    system talent target taught tenant tender tennis thanks theory thirty though threat ticket timber
    tissue toward travel treaty twelve twenty unable unique united unless unlike update useful valley
    varied vendor versus victim vision visual volume walker wealth weapon weekly weight window winner
    winter within wonder worker writer yellow
    """.split()
)


@dataclass
class GlyphSample:
    """One rendered line: the image, its text, one ink box per character (xyxy, pixels)."""

    image: Image.Image
    text: str
    char_boxes: list[tuple[float, float, float, float]]
    font: str
    split: str = ""
    index: int = 0
    meta: dict = field(default_factory=dict)


def alphabet() -> str:
    """Every character a line can contain, in a fixed order (lowercase letters, then digits)."""
    return ALPHABET


def _check_split(split: str) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_IDS)}")


def font_path(name: str) -> str:
    """The path of one of matplotlib's bundled DejaVu fonts."""
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", f"{name}.ttf")
    if not os.path.exists(path):
        raise OSError(f"font {name!r} not found at {path}")
    return path


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    # The basic layout engine gives the same pixels with or without libraqm installed.
    return ImageFont.truetype(font_path(name), size, layout_engine=ImageFont.Layout.BASIC)


def _text(rng: np.random.Generator) -> str:
    if rng.random() < WORD_PROB:
        return str(WORDS[rng.integers(len(WORDS))])
    n = int(rng.integers(MIN_CHARS, MAX_CHARS + 1))
    return "".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=n))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(background base colour, ink colour): dark on light or light on dark, >= 80 apart."""
    light = rng.uniform(180, 250, size=3)
    dark = rng.uniform(0, 90, size=3)
    if rng.random() < 0.7:
        bg, ink = light, dark
    else:
        bg, ink = dark, light
    return bg, tuple(int(v) for v in ink)


def _background(rng: np.random.Generator, base: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The base colour with a faint horizontal gradient and pixel noise."""
    h, w = size
    slope = rng.uniform(-12, 12)
    ramp = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None] * slope
    noise = rng.normal(0, 3.0, size=(h, w, 3))
    pixels = base[None, None, :] + ramp + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def render_line(split: str, index: int, seed: int = 0) -> GlyphSample:
    """Line `index` of `split`: a 3-6 character word or code on a 32 x 128 RGB image."""
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([_STREAM, seed, SPLIT_IDS[split], index]))
    text = _text(rng)
    font_name = FONTS[rng.integers(len(FONTS))]
    height, width = IMAGE_SIZE
    size = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
    # Shrink the font until the whole line fits inside the margins.
    while True:
        font = _font(font_name, size)
        x0, top, x1, bottom = font.getbbox(text, anchor="ls")
        if (x1 - x0 <= width - 2 * MARGIN and bottom - top <= height - 2 * MARGIN) or size <= 8:
            break
        size -= 1
    # Pen position (left end of the baseline): the ink starts 0-JITTER[1] pixels right of the
    # left margin (lines are left-aligned, as in cropped text lines) and is vertically centred
    # give or take JITTER[0] pixels, always inside the margins.
    x = MARGIN - x0 + rng.uniform(0, max(0.0, min(JITTER[1], width - 2 * MARGIN - (x1 - x0))))
    cy = (height - (bottom - top)) / 2 - top + rng.uniform(-JITTER[0], JITTER[0])
    y = float(np.clip(cy, MARGIN - top, height - MARGIN - bottom))
    x, y = round(x, 2), round(y, 2)
    bg, ink = _colours(rng)
    image = _background(rng, bg, (height, width))
    draw = ImageDraw.Draw(image)
    boxes = []
    for i, ch in enumerate(text):
        pen = (x + font.getlength(text[:i]), y)
        draw.text(pen, ch, fill=ink, font=font, anchor="ls")
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).text(pen, ch, fill=255, font=font, anchor="ls")
        box = mask.point(lambda v: 255 if v >= INK_LEVEL else 0).getbbox()
        if box is None:  # a glyph too faint to pass the threshold: fall back to PIL's box
            box = draw.textbbox(pen, ch, font=font, anchor="ls")
        boxes.append(tuple(float(v) for v in box))
    return GlyphSample(
        image=image,
        text=text,
        char_boxes=boxes,
        font=font_name,
        split=split,
        index=index,
        meta={"font_size": size, "ink": ink, "background": tuple(int(v) for v in bg)},
    )


class GlyphDataset(torch.utils.data.Dataset):
    """The first `size` lines of a split, as a map-style dataset."""

    def __init__(self, split: str, size: int, seed: int = 0) -> None:
        _check_split(split)
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> GlyphSample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} lines")
        return render_line(self.split, index, self.seed)

    def __iter__(self) -> Iterator[GlyphSample]:
        return (self[i] for i in range(self.size))
