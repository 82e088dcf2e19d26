"""What a new user hits in the first hour, through the Python API: models that cannot be loaded,
text the model cannot read, prepared tensors it would misread, layers given as strings, model
instances without a processor, generation lengths and per-family default methods."""

from __future__ import annotations

import ast
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_blip import make_processor as blip_processor
from test_blip import tiny as tiny_blip
from test_clip import processor_for as clip_processor
from test_clip import tiny_clip
from test_flava import processor as flava_processor
from test_flava import tiny_flava
from test_siglip import processor_for as siglip_processor
from test_siglip import tiny_siglip
from test_vilt import processor as vilt_processor
from test_vilt import tiny_vilt
from transformers import BlipForImageTextRetrieval

import groundcam as gc
from groundcam import api
from groundcam.adapters import FAMILIES, adapter_class
from groundcam.contract import SOURCE_KINDS
from groundcam.errors import GroundcamWarning, InputError

SRC = Path(__file__).resolve().parents[1] / "src" / "groundcam"


@pytest.fixture(scope="module")
def shapes():
    return gc.load("albef-tiny-shapes")


@pytest.fixture(scope="module")
def scene():
    from groundcam.data.shapes import generate_scene

    return generate_scene("test", 0, 0).image


def picture(seed: int = 0, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("bad", [None, 3, "", "   ", ["albef-tiny-shapes"]])
def test_load_refuses_what_is_not_a_model_in_one_line(bad):
    with pytest.raises(InputError, match="gc.load\\(model\\): expected a built-in name") as e:
        gc.load(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/model", "no such file or directory"),
        ("/tmp/groundcam-missing-ALBEF.pth", "no such file or directory"),
        ("missing.safetensors", "no such file or directory"),
        ("not a hub id!", "hub ids look like owner/name"),
        ("albef-tiny", "hub ids look like owner/name"),
    ],
)
def test_names_that_are_no_model_fail_at_once(name, message):
    start = time.perf_counter()
    with pytest.raises(InputError, match=message):
        gc.load(name)
    assert time.perf_counter() - start < 2


def test_a_hub_id_offline_fails_at_once_without_retries():
    start = time.perf_counter()
    with pytest.raises(InputError, match="offline: the hub cannot be reached"):
        gc.load("someone/no-such-model")
    assert time.perf_counter() - start < 5


def test_an_unreachable_hub_reads_the_cache_only_and_restores_the_mode(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probed = []
    monkeypatch.setattr(api, "_reachable", lambda endpoint: probed.append(endpoint) or False)
    start = time.perf_counter()
    with pytest.raises(InputError, match="offline: the hub cannot be reached"):
        gc.load("someone/no-such-model")
    assert time.perf_counter() - start < 5
    assert probed == [constants.ENDPOINT] and constants.HF_HUB_OFFLINE is False


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match="notes.txt: a file, but not a checkpoint"):
        gc.load(path)


def test_an_unavailable_device_is_one_line():
    with pytest.raises(InputError, match="device 'cuda:7' is not available"):
        gc.load("albef-tiny-shapes", device="cuda:7")
    with pytest.raises(InputError, match="not a torch device"):
        gc.load("albef-tiny-shapes", device="tpu-please")


# ----------------------------------------------------------------------------- text


def test_mostly_unknown_words_warn_once_per_phrase(shapes, scene):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            ex = shapes.explain(scene, ["a woman in uniform", "the red circle"])
    mine = [w for w in caught if issubclass(w.category, GroundcamWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    assert "'a woman in uniform': 3 of its 4 tokens are unknown" in str(mine[0].message)
    assert ex.tokens[0] == ["[CLS]", "a", "[UNK]", "[UNK]", "[UNK]", "[SEP]"]


def test_a_readable_phrase_does_not_warn(shapes, scene):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroundcamWarning)
        shapes.explain(scene, ["the red circle", "a blue square"])


@pytest.mark.parametrize("phrase", ["?!", "...", "()"])
def test_a_phrase_empty_after_cleaning_is_refused(shapes, scene, phrase):
    with pytest.raises(InputError, match=r"has no text the model can read: .*special tokens only"):
        shapes.explain(scene, ["the red circle", phrase])


def test_albef_warns_when_it_truncates_a_long_phrase(shapes, scene):
    phrase = " ".join(["the red circle"] * 11)  # 33 words: pre_caption keeps 30
    with pytest.warns(GroundcamWarning, match="truncated to ALBEF's 30 words"):
        ex = shapes.explain(scene, [phrase])
    assert len(ex.tokens[0]) == 32  # [CLS] + 30 words + [SEP], the position limit too
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroundcamWarning)
        shapes.explain(scene, [" ".join(["the red circle"] * 10)])  # 30 words: no warning


@pytest.mark.parametrize("bad", [[3], [None], ["ok", b"bytes"]])
def test_phrases_that_are_not_strings_are_refused(shapes, scene, bad):
    with pytest.raises(InputError, match="phrases must be strings"):
        shapes.explain(scene, bad)


# ----------------------------------------------------------------------------- layers


def test_a_layer_given_as_digits_is_read_as_that_layer(shapes, scene):
    as_int = shapes.explain(scene, ["the red circle"], method="gradcam", layer=1)
    as_str = shapes.explain(scene, ["the red circle"], method="gradcam", layer="1")
    assert as_str.layer == 1 and torch.equal(as_int.maps, as_str.maps)


@pytest.mark.parametrize("bad", [True, False, 1.0, "last", "1.5", [1]])
def test_layers_that_are_not_integers_are_refused(shapes, scene, bad):
    with pytest.raises(InputError, match="layer must be an integer"):
        shapes.explain(scene, ["the red circle"], method="gradcam", layer=bad)


def test_layers_follow_the_method_and_the_default_is_among_them(shapes):
    cfg = shapes.model.config  # 4 text layers, cross-attention from layer 1 on
    assert shapes.layers("attn-gradcam") == list(range(cfg.fusion_layer, cfg.text_layers))
    assert shapes.layers("gradcam") == list(range(cfg.vision_depth))
    assert shapes.layers("relevance") == []
    r = shapes.resolve()
    assert (r.method.name, r.target, r.layer) == ("attn-gradcam", "itm", 2)  # middle, not last
    assert shapes.resolve("gradcam", target="similarity").layer == cfg.vision_depth - 2


# ----------------------------------------------------------------------------- tensors


@pytest.fixture(scope="module")
def tensors(shapes, scene):
    return shapes.prepare([scene], ["the red circle", "a blue square"])


def test_non_finite_pixels_are_refused(shapes, tensors):
    pv, ids, mask = tensors
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = pv.clone()
        broken[0, 1, 2, 3] = bad
        with pytest.raises(InputError, match="pixel_values hold NaN or infinite values"):
            shapes.explain_tensors(broken, ids, mask, image_index=torch.zeros(2).long())
        with pytest.raises(InputError, match="NaN or infinite"):
            shapes.score_tensors(broken, ids, mask, torch.zeros(2).long())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda pv, ids, m: (pv.to(torch.uint8), ids, m), "pixel_values must be a float tensor"),
        (lambda pv, ids, m: (pv[0], ids, m), "pixel_values must be a float tensor"),
        (lambda pv, ids, m: (pv.numpy(), ids, m), "pixel_values must be a torch.Tensor"),
        (lambda pv, ids, m: (pv, ids.float(), m), "input_ids must be an integer tensor"),
        (lambda pv, ids, m: (pv, ids, m[:, :-1]), "attention_mask has shape"),
    ],
)
def test_wrong_tensors_get_one_line_not_a_torch_error(shapes, tensors, change, message):
    pv, ids, mask = change(*tensors)
    with pytest.raises(InputError, match=message):
        shapes.explain_tensors(pv, ids, mask, image_index=torch.zeros(2).long())


def test_image_index_is_checked(shapes, tensors):
    pv, ids, mask = tensors
    with pytest.raises(InputError, match="pass image_index"):
        shapes.explain_tensors(pv, ids, mask)
    with pytest.raises(InputError, match="must lie in 0..0"):
        shapes.explain_tensors(pv, ids, mask, image_index=torch.tensor([0, 1]))
    with pytest.raises(InputError, match="must be 2 integers"):
        shapes.explain_tensors(pv, ids, mask, image_index=torch.tensor([0]))


def test_score_tensors_equals_scores(shapes, scene, tensors):
    pv, ids, mask = tensors
    direct = shapes.score_tensors(pv, ids, mask, torch.zeros(2).long()).reported
    assert torch.allclose(direct, shapes.scores(scene, ["the red circle", "a blue square"]))


# ----------------------------------------------------------------------------- generation


def test_generation_length_is_the_models_own_unless_given(scene):
    ocr = gc.load("trocr-tiny-glyphs")
    limit = ocr.model.generation_config.max_length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = ocr.explain_generation(scene)
        short = ocr.explain_generation(scene, max_new_tokens=2)
    about_length = [str(w.message) for w in caught if "max_" in str(w.message)]
    assert about_length == []
    assert ocr.model.generation_config.max_length == limit  # the model's config is untouched
    assert 1 <= len(gen.positions) and max(gen.positions) < limit
    assert len(short) <= 2 and gen.method == "attention"  # the card's best method


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_bad_generation_lengths_are_refused(scene, bad):
    with pytest.raises(InputError, match="max_new_tokens must be a positive integer"):
        gc.load("trocr-tiny-glyphs").explain_generation(scene, max_new_tokens=bad)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_to_explain_is_refused(scene, text):
    with pytest.raises(InputError, match="text= must be a non-empty string"):
        gc.load("trocr-tiny-glyphs").explain_generation(scene, text=text)


# ----------------------------------------------------------------------------- families


def test_each_family_explains_with_its_default_method(tokenizer):
    clip = gc.load(tiny_clip(len(tokenizer)), processor=clip_processor(tokenizer))
    ex = clip.explain(picture(), ["a red circle"])  # attn-gradcam is not defined for CLIP
    assert ex.method == "gradcam" and clip.default_method() == "gradcam"
    assert gc.load("albef-tiny-shapes").default_method() == "attn-gradcam"
    assert gc.load("trocr-tiny-glyphs").default_method() == "attention"


INSTANCES = {
    "clip": (lambda t: tiny_clip(len(t)), clip_processor),
    "siglip": (lambda t: tiny_siglip(len(t)), siglip_processor),
    "blip-itm": (lambda t: tiny_blip(BlipForImageTextRetrieval, t), blip_processor),
    "vilt": (lambda t: tiny_vilt(len(t)), vilt_processor),
    "flava": (lambda t: tiny_flava(len(t)), flava_processor),
}


@pytest.mark.parametrize("family", sorted(INSTANCES))
def test_an_instance_without_a_processor_gets_one_from_its_config(tokenizer, family):
    build, processor = INSTANCES[family]
    model = build(tokenizer)
    with pytest.warns(GroundcamWarning, match="no processor given .* built .* from the model"):
        built = gc.load(model, tokenizer=tokenizer)
    given = gc.load(model, processor=processor(tokenizer))
    image = picture(1, (80, 72))
    assert torch.allclose(built.prepare_images([image]), given.prepare_images([image]), atol=1e-5)
    ex = built.explain(image, ["a red circle"])
    assert torch.allclose(ex.maps, given.explain(image, ["a red circle"]).maps, atol=1e-5)


def test_a_vision_encoder_decoder_instance_gets_a_vit_processor():
    from test_vision_encoder_decoder import tiny_ved
    from transformers import PreTrainedTokenizerFast

    from groundcam.train.trocr_glyphs import char_tokenizer

    tok = char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    model = tiny_ved(len(tok))
    with pytest.warns(GroundcamWarning, match="ViTImageProcessor"):
        ocr = gc.load(model, tokenizer=tok)
    height, width = model.config.encoder.image_size  # non-square: 32 x 64
    half = np.zeros((30, 90, 3), dtype=np.uint8)
    half[:, 45:] = 255
    pv = ocr.prepare_images([Image.fromarray(half)])
    assert tuple(pv.shape) == (1, 3, height, width)
    assert float(pv.min()) == pytest.approx(-1) and float(pv.max()) == pytest.approx(1)


# ----------------------------------------------------------------------------- the house


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_adapter_declares_its_sources_in_one_table(family):
    cls = adapter_class(family)
    assert "table" in vars(cls) or any("table" in vars(b) for b in cls.__mro__[1:-2])
    for ladder in ("layers", "default_layer", "record_spec", "check", "sources"):
        assert ladder not in vars(cls), f"{cls.__name__} answers {ladder} itself"
    assert set(cls.SOURCES) <= set(SOURCE_KINDS)


def test_tables_of_built_models_are_consistent(tokenizer):
    models = [
        gc.load("albef-tiny-shapes"),
        gc.load("trocr-tiny-glyphs"),
        gc.load(tiny_clip(len(tokenizer)), processor=clip_processor(tokenizer)),
        gc.load(tiny_vilt(len(tokenizer)), processor=vilt_processor(tokenizer)),
    ]
    for explainer in models:
        a = explainer.adapter
        assert set(a.sources()) <= set(a.SOURCES)
        for kind in a.sources():
            row = a.source(kind)
            for target in row.targets or a.targets:
                default = a.default_layer(kind, target)
                assert (default is None) == (not row.layers), (a.family, kind)
                assert default is None or default in row.layers


def test_adapters_and_methods_never_import_each_other():
    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    for path in (SRC / "adapters").glob("*.py"):
        assert not any(m.startswith("groundcam.methods") for m in imports(path)), path.name
    for path in (SRC / "methods").glob("*.py"):
        assert not any(m.startswith("groundcam.adapters") for m in imports(path)), path.name
    for path in (SRC / "eval").glob("*.py"):
        mods = imports(path)
        assert not any(m.startswith(("groundcam.adapters", "groundcam.train")) for m in mods), path
    for path in (SRC / "cli").glob("*.py"):
        assert not any(m.startswith("groundcam.adapters") for m in imports(path)), path.name
    assert "groundcam.eval.pointing" not in imports(SRC / "viz" / "overlay.py")
