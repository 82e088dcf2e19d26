"""The page's handlers are the public API: the same maps, files and pointing results as
`Explainer.explain`, `Explanation.save`, `groundcam.pointing_game` and `groundcam explain`."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from web_corpus import noise_png

import groundcam as gc
from groundcam.cli import main
from groundcam.data.shapes import generate_scene
from groundcam.errors import InputError
from groundcam.io import read_image
from groundcam.web import handlers as h
from groundcam.web.limits import Limits
from groundcam.web.models import ModelCache

PHRASES = ["the red circle", "the blue square"]


@pytest.fixture(scope="module")
def cache(one_thread) -> ModelCache:
    return ModelCache()


@pytest.fixture
def workspace(tmp_path) -> h.Workspace:
    return h.Workspace(tmp_path / "ws")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    sample = generate_scene("test", 5)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    sample.image.save(path)
    return path, sample


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_explain_gives_the_apis_maps_and_writes_what_groundcam_explain_writes(
    cache, workspace, scene, tmp_path
):
    path, _ = scene
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(path), "\n".join(PHRASES), "gradcam"
    )
    direct = gc.load("albef-tiny-shapes").explain(read_image(path), PHRASES, method="gradcam")
    assert torch.allclose(res.explanation.maps, direct.maps, atol=1e-6)
    assert res.explanation.maps.max() > 0
    assert torch.allclose(res.explanation.scores, direct.scores, atol=1e-6)
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["explain", str(path), *PHRASES, "--method", "gradcam", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    files = h.saved_files(res.folder)
    names = [f.name for f in files]
    assert names[:2] == ["maps.npz", "meta.json"] and names[-1] == "groundcam-explain.zip"
    assert sorted(names[2:-1]) == sorted(p.name for p in out.glob("*.png"))
    ours, cli = _arrays(files[0]), _arrays(out / "maps.npz")
    assert ours.keys() == cli.keys() == {"maps", "raw_maps"}
    for key in ours:
        np.testing.assert_allclose(ours[key], cli[key], rtol=1e-5, atol=1e-7)
    meta, cli_meta = (json.loads(p.read_text()) for p in (files[1], out / "meta.json"))
    assert meta.keys() == cli_meta.keys()
    for key in ("method", "layer", "target", "model", "phrases", "tokens", "grid"):
        assert meta[key] == cli_meta[key], key
    np.testing.assert_allclose(meta["scores"], cli_meta["scores"], rtol=1e-5)


def test_overlays_labels_and_per_token_maps(cache, workspace, scene):
    path, _ = scene
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(path), "\n".join(PHRASES)
    )
    assert res.explanation.method == "attn-gradcam"  # the family's default
    pictures = h.phrase_overlays(res, 0.5, "viridis")
    assert len(pictures) == 2
    for (picture, label), phrase, s in zip(pictures, PHRASES, res.explanation.scores, strict=True):
        assert picture.size == res.image.size
        assert label == f"{phrase} - score {float(s):.3f}"
    # opacity 0 leaves the photo untouched where the colour bar is not
    plain, _ = h.phrase_overlays(res, 0.0, "inferno")[0]
    assert np.array_equal(np.asarray(plain)[-20:, :40], np.asarray(res.image)[-20:, :40])
    tokens = h.token_overlays(res, 1, 0.5, None)
    assert [label for _, label in tokens] == [
        f"{t}: {tok}" for t, tok in enumerate(res.explanation.tokens[1])
    ]
    assert [label for _, label in tokens][1:3] == ["1: the", "2: blue"]
    with pytest.raises(InputError, match="no phrase 2"):
        h.token_overlays(res, 2, 0.5, None)


def test_methods_without_token_maps_say_so(cache, workspace, scene):
    path, _ = scene
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(path), "a star", "rollout"
    )
    assert res.explanation.layer is None
    with pytest.raises(InputError, match="has no per-token maps"):
        h.token_overlays(res, 0, 0.5, None)


def test_a_drawn_box_is_scored_by_the_pointing_game(cache, workspace, scene):
    path, sample = scene
    phrase = sample.phrases[0]
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes-amc", str(path), phrase.text
    )
    box = h.parse_box(
        [phrase.boxes[0][2], phrase.boxes[0][3], phrase.boxes[0][0], phrase.boxes[0][1]],
        res.image.size,
    )
    assert box == tuple(phrase.boxes[0])  # corners in any order
    point = h.score_box(res, 0, [box])
    expected = gc.pointing_game(res.explanation.maps[0], [box], image_size=(128, 128))
    assert (point.hit, point.point) == (expected.hit, expected.point)
    row = h.pointing_rows(res)[0]
    assert row[3] == ("hit" if expected.hit else "miss")
    assert row[4] == f"{expected.point[0]}, {expected.point[1]}"
    assert re.fullmatch(r"pointing: [01] of 1 hit \(protocol amc\)", h.accuracy_line(res))
    # a box around the pointed pixel is a hit, one away from it a miss
    x, y = expected.point
    assert h.score_box(res, 0, [(x - 2, y - 2, x + 3, y + 3)]).hit is True
    far = (0, 0, 5, 5) if x > 20 and y > 20 else (120, 120, 127, 127)
    assert h.score_box(res, 0, [far]).hit is False
    torch_ray = h.score_box(res, 0, [far], "torchray")
    assert torch_ray.protocol == "torchray"
    with pytest.raises(InputError, match="protocol 'albef-boxes'"):
        h.score_box(res, 0, [far], "albef-boxes")


def test_example_scenes_score_every_phrase_with_its_true_box(cache, workspace, tmp_path):
    examples = h.make_examples(tmp_path / "ex", scenes=1, lines=1)
    scene, line = examples
    assert not scene.captions and line.captions and line.path.is_file()
    res = h.explain_phrases(
        cache,
        workspace,
        Limits(),
        "albef-tiny-shapes-amc",
        str(scene.path),
        "\n".join(scene.phrases),
        known_boxes=scene.boxes,
    )
    assert sorted(res.points) == list(range(len(scene.phrases)))
    sample = generate_scene("test", 0)
    for i, p in enumerate(sample.phrases):
        r = gc.pointing_game(res.explanation.maps[i], p.boxes, image_size=(128, 128))
        assert res.points[i].hit == r.hit and res.points[i].point == r.point


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ((None, 1, 2, 3), "needs x0, y0, x1 and y1"),
        ((1, 2, 3), "needs x0, y0, x1 and y1"),
        (("a", 1, 2, 3), "not four numbers"),
        ((float("nan"), 1, 2, 3), "not four finite numbers"),
        ((5, 5, 5, 9), "is empty inside the 64x32 image"),
        ((100, 100, 200, 200), "is empty inside the 64x32 image"),
    ],
)
def test_bad_boxes_are_one_line(values, message):
    with pytest.raises(InputError, match=message):
        h.parse_box(values, (64, 32))
    assert h.parse_box((-5, -5, 100, 10), (64, 32)) == (0, 0, 64, 10)


def test_bad_requests_are_refused_before_the_model_runs(cache, workspace, scene, monkeypatch):
    path, _ = scene
    limits = Limits(max_phrases=2, max_tokens=8)
    run = ("albef-tiny-shapes", str(path))
    with pytest.raises(InputError, match="3 phrases given"):
        h.explain_phrases(cache, workspace, limits, *run, "a\nb\nc")
    with pytest.raises(InputError, match="the phrases make 1[0-9] tokens"):
        h.explain_phrases(cache, workspace, limits, *run, "the red circle\nthe big blue star")
    with pytest.raises(InputError, match="not offered here"):
        h.explain_phrases(cache, workspace, limits, "/etc/passwd", str(path), "a")
    with pytest.raises(InputError, match="generates text: use 'Generate and explain'"):
        h.explain_phrases(cache, workspace, limits, "trocr-tiny-glyphs", str(path), "a")
    with pytest.raises(InputError, match="does not generate text"):
        h.explain_caption(cache, workspace, limits, "albef-tiny-shapes", str(path))
    with pytest.raises(InputError, match="layer 7 is not"):
        h.explain_phrases(cache, workspace, limits, *run, "a circle", "gradcam", "7")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        h.explain_phrases(cache, workspace, limits, *run, "a circle", "nope")


def test_unreadable_text_warns_on_the_page(cache, workspace, scene):
    path, _ = scene
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(path), "a woman in uniform"
    )
    assert len(res.warnings) == 1 and "3 of its 4 tokens are unknown" in res.warnings[0]


def test_caption_mode_matches_explain_generation_and_groundcam_caption(cache, workspace, tmp_path):
    examples = h.make_examples(tmp_path / "ex", scenes=0, lines=1)
    path = examples[0].path
    res = h.explain_caption(cache, workspace, Limits(), "trocr-tiny-glyphs", str(path))
    gen = gc.load("trocr-tiny-glyphs").explain_generation(read_image(path))
    assert res.generation.text == gen.text and res.generation.text
    assert torch.allclose(res.generation.maps, gen.maps, atol=1e-6)
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["caption", str(path), "--model", "trocr-tiny-glyphs", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    files = h.saved_files(res.folder)
    assert sorted(f.name for f in files[:-1]) == sorted(p.name for p in out.iterdir())
    np.testing.assert_allclose(
        _arrays(files[0])["raw_maps"], _arrays(out / "maps.npz")["raw_maps"], rtol=1e-5
    )
    page = h.caption_html(res, 0.5, "inferno")
    assert page.count('class="gc-tok"') == len(gen.tokens)
    assert page.count("data:image/png;base64,") == len(gen.tokens)
    labels = [label for _, label in h.caption_overlays(res, 0.5, None)]
    assert labels[0].startswith(f"0: {gen.tokens[0]} (p=")
    given = h.explain_caption(
        cache, workspace, Limits(), "trocr-tiny-glyphs", str(path), text="<b>ab</b>"
    )
    assert "<b>" not in h.caption_html(given, 0.5, None)  # tokens are escaped


def test_models_are_only_those_offered_and_each_loads_once(monkeypatch):
    loads = []
    real = gc.load

    def counting(name, **kwargs):
        loads.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(gc, "load", counting)
    cache = ModelCache()
    assert cache.names == list(gc.builtin_models())
    threads = [threading.Thread(target=cache.get, args=("albef-tiny-shapes",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["albef-tiny-shapes"] and cache.loads == 1
    for name in ("../albef-tiny-shapes", "Salesforce/blip-itm-base-coco", "", None):
        with pytest.raises(InputError, match="not offered here"):
            cache.get(name)
    assert loads == ["albef-tiny-shapes"]
    assert ModelCache(["x/y"], builtins=False).names == ["x/y"]
    with pytest.raises(InputError, match="no models to offer"):
        ModelCache([], builtins=False)


def test_dropdown_choices_mark_the_defaults(cache):
    targets, target = h.target_choices(cache, "albef-tiny-shapes")
    assert target == "itm" and ("itm (default)", "itm") in targets
    methods, method = h.method_choices(cache, "albef-tiny-shapes", "itm")
    assert method == "attn-gradcam" and ("attn-gradcam (default)", "attn-gradcam") in methods
    assert {v for _, v in methods} == set(gc.families()["albef"])
    layers, layer = h.layer_choices(cache, "albef-tiny-shapes", "attn-gradcam", "itm")
    explainer = cache.get("albef-tiny-shapes")
    assert [v for _, v in layers] == [str(k) for k in explainer.layers("attn-gradcam")]
    assert layer == str(explainer.resolve("attn-gradcam").layer)
    assert (f"{layer} (default)", layer) in layers
    assert h.layer_choices(cache, "albef-tiny-shapes", "rollout", "itm") == (
        [("every layer (this method reads them all)", "")],
        "",
    )
    _, ocr = h.method_choices(cache, "trocr-tiny-glyphs", "token")
    assert ocr == "attention"


def test_workspace_keeps_only_the_newest_results(tmp_path):
    ws = h.Workspace(tmp_path / "ws", keep=3)
    folders = [ws.new_folder("explain") for _ in range(5)]
    assert [f.exists() for f in folders] == [False, False, True, True, True]


def test_noise_image_explains_without_errors(cache, workspace, tmp_path):
    path = noise_png(tmp_path / "noise.png", 97, 61)
    res = h.explain_phrases(cache, workspace, Limits(), "albef-tiny-shapes", str(path), "a star")
    assert res.explanation.maps.shape[0] == 1 and torch.isfinite(res.explanation.maps).all()
    assert h.phrase_overlays(res, 0.5, None)[0][0].size == (97, 61)


def test_an_image_only_method_is_said_once_on_the_page(cache, workspace, scene):
    """Rollout gives every phrase one map: the status box says so once (its note), not again
    as the API's warning."""
    from groundcam.web.app import _summary

    path, _ = scene
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(path), "\n".join(PHRASES), "rollout"
    )
    assert any("does not read the text" in w for w in res.warnings)
    text = _summary(res, "explained")
    assert text.count("does not read the text") == 1 and "note: rollout" in text
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(path), "\n".join(PHRASES)
    )
    assert "does not read the text" not in _summary(res, "explained")
