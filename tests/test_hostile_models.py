"""Hostile model folders and files: no code from a folder ever runs (even answering "y"), broken
or hostile weights, tokenizers and configs are one line naming the file (exit 2 on the command
line), a config too large for the machine is refused before anything is allocated, and loads
write no progress bars."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from tiny import SMALL, VISION, saved, tiny_albef
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import groundcam as gc
from groundcam import model_files
from groundcam.cli import main
from groundcam.errors import InputError
from groundcam.models.albef import AlbefConfig, AlbefModel

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny CLIP saved with its processor and tokenizer, as transformers saves one."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(SMALL, vocab_size=len(tokenizer), max_position_embeddings=16),
        vision_config=dict(VISION),
        projection_dim=16,
    )
    ip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = CLIPProcessor(image_processor=ip, tokenizer=tokenizer)
    return saved(tmp_path_factory.mktemp("clip"), CLIPModel(cfg).eval(), processor)


@pytest.fixture()
def image_file(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def copy(src: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def explain(model: Path | str, image: Path, input: str | None = None):
    args = ["explain", "--model", str(model), str(image), "red", "--out", str(image.parent / "o")]
    return CliRunner().invoke(main, args, input=input)


def one_error_line(r, *needles) -> str:
    """Exit 2, and stderr exactly one `groundcam: error:` line holding every needle."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("groundcam: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in r.output
    return lines[0]


def refused(model, *needles) -> str:
    """gc.load(model) raises InputError, one line holding every needle."""
    with pytest.raises(InputError) as e:
        gc.load(model)
    text = str(e.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ------------------------------------------------------------- 1. no code from a model folder
PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("the model folder's code ran")
from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor, PreTrainedTokenizerFast
class EvilConfig(CLIPConfig):
    model_type = "evil"
class EvilProcessor(CLIPProcessor):
    pass
class EvilImageProcessor(CLIPImageProcessor):
    pass
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""

# Each file transformers reads `auto_map` from, with the entries that make it import payload.py.
CUSTOM_CODE = {
    "config.json": dict(
        model_type="evil",
        architectures=["CLIPModel"],
        auto_map={"AutoConfig": "payload.EvilConfig"},
    ),
    "processor_config.json": dict(
        processor_class="EvilProcessor", auto_map={"AutoProcessor": "payload.EvilProcessor"}
    ),
    "preprocessor_config.json": dict(
        image_processor_type="EvilImageProcessor",
        auto_map={"AutoImageProcessor": "payload.EvilImageProcessor"},
    ),
    "tokenizer_config.json": dict(
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["payload.EvilTokenizer", None]},
    ),
}


def with_custom_code(src: Path, where: Path, file: str) -> tuple[Path, Path]:
    """A copy of `src` whose `file` points transformers at payload.py, which writes a marker."""
    folder, marker = copy(src, where), where / "MARKER"
    (folder / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    edit_json(folder / file, **CUSTOM_CODE[file])
    return folder, marker


@pytest.fixture()
def no_prompt(monkeypatch):
    """Answer "y" to any prompt, and record that one was made."""
    asked = []

    def answer(prompt=""):
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer)
    return asked


@pytest.mark.parametrize("file", sorted(CUSTOM_CODE))
def test_a_folder_asking_to_run_code_is_refused_by_the_library(clip_dir, tmp_path, file, no_prompt):
    folder, marker = with_custom_code(clip_dir, tmp_path, file)
    refused(folder, str(folder / file), "'auto_map'")
    assert not marker.exists()
    assert no_prompt == []


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_an_albef_folder_asking_to_run_code_is_refused(tiny_model_dir, tmp_path, file, no_prompt):
    folder, marker = with_custom_code(tiny_model_dir, tmp_path, file)
    if file == "config.json":  # keep it an ALBEF folder, with the key alone
        edit_json(folder / file, model_type="albef", architectures=None)
    refused(folder, str(folder / file), "'auto_map'")
    assert not marker.exists()


@pytest.mark.parametrize("file", sorted(CUSTOM_CODE))
def test_the_command_line_answering_yes_runs_nothing(clip_dir, tmp_path, image_file, file):
    folder, marker = with_custom_code(clip_dir, tmp_path, file)
    r = explain(folder, image_file, input="y\n" * 1000)
    one_error_line(r, str(folder / file), "'auto_map'")
    assert "[y/N]" not in r.output
    assert not marker.exists()


def test_a_separate_process_fed_yes_on_stdin_runs_nothing(clip_dir, tmp_path, image_file):
    """`yes y | groundcam explain --model FOLDER ...` as a user would type it."""
    folder, marker = with_custom_code(clip_dir, tmp_path, "processor_config.json")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "groundcam", "explain", "--model", str(folder)]
    cmd += [str(image_file), "red", "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, input="y\n" * 10_000, capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: "), r.stderr
    assert str(folder / "processor_config.json") in lines[0] and "'auto_map'" in lines[0]
    assert "[y/N]" not in r.stdout + r.stderr
    assert not marker.exists()


def test_every_load_passes_trust_remote_code_false_even_past_the_check(
    clip_dir, tmp_path, monkeypatch, no_prompt
):
    """With the folder check taken away, transformers itself is told never to run the code:
    the custom processor is not imported, nothing prompts, the model loads with its own."""
    folder, marker = with_custom_code(clip_dir, tmp_path, "processor_config.json")
    monkeypatch.setattr(model_files, "check_no_remote_code", lambda directory: None)
    monkeypatch.setattr("groundcam.api.check_directory", lambda directory: None)
    explainer = gc.load(folder)
    assert type(explainer.adapter.model).__name__ == "CLIPModel"
    assert not marker.exists()
    assert no_prompt == []


def hub_cache(tmp_path: Path, monkeypatch, src: Path, repo: str) -> Path:
    """A hub cache holding `src` as the snapshot of `repo` (main), made the one in use."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / "0123456789abcdef"
    shutil.copytree(src, snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_a_hub_id_whose_cached_files_ask_to_run_code_is_refused(
    clip_dir, tmp_path, monkeypatch, no_prompt
):
    src, marker = with_custom_code(clip_dir, tmp_path, "config.json")
    snapshot = hub_cache(tmp_path, monkeypatch, src, "someone/evil-clip")
    refused("someone/evil-clip", str(snapshot / "config.json"), "'auto_map'")
    assert not marker.exists()
    assert no_prompt == []


def test_a_clean_cached_hub_id_still_loads(clip_dir, tmp_path, monkeypatch):
    hub_cache(tmp_path, monkeypatch, clip_dir, "someone/tiny-clip")
    assert gc.load("someone/tiny-clip").family == "clip"


# ------------------------------------------------------------- 7. broken and hostile files
def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def hostile_weights(good: bytes) -> dict[str, bytes]:
    four_tb = {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "header length 2^62": struct.pack("<Q", 1 << 62) + b"{}",
        "4 TB shape": safetensors_bytes({"w": four_tb}, b"\0" * 64),
        "shape larger than its data": safetensors_bytes(
            {"w": dict(four_tb, data_offsets=[0, 64])}, b"\0" * 64
        ),
        "garbage": bytes(range(256)) * 4,
    }


@pytest.mark.parametrize("kind", list(hostile_weights(b"x" * 100)))
@pytest.mark.parametrize("family", ["albef", "clip"])
def test_hostile_safetensors_in_a_folder_are_one_line(
    tiny_model_dir, clip_dir, tmp_path, family, kind
):
    folder = copy(tiny_model_dir if family == "albef" else clip_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(hostile_weights(weights.read_bytes())[kind])
    refused(folder, str(weights))


@pytest.mark.parametrize("kind", ["truncated", "header length 2^62", "4 TB shape"])
def test_hostile_safetensors_on_the_command_line_exit_2(tiny_model_dir, tmp_path, image_file, kind):
    folder = copy(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(hostile_weights(weights.read_bytes())[kind])
    one_error_line(explain(folder, image_file), str(weights), "safetensors")


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory, tokenizer) -> bytes:
    """A tiny ALBEF state dict as the official release wraps it ({'model': ...}), as bytes."""
    path = tmp_path_factory.mktemp("pth") / "albef.pth"
    torch.save({"model": tiny_albef(len(tokenizer)).state_dict()}, path)
    return path.read_bytes()


def test_an_intact_official_checkpoint_still_loads(official_pth, tmp_path):
    path = tmp_path / "albef.pth"
    path.write_bytes(official_pth)
    assert gc.load(path, num_heads=4, text_num_heads=4).family == "albef"


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_broken_official_pth_is_one_line(official_pth, tmp_path, image_file, kind):
    path = tmp_path / "albef.pth"
    path.write_bytes(
        {"empty": b"", "truncated": official_pth[:4000], "garbage": b"\x80\x02" * 999}[kind]
    )
    refused(path, str(path))
    one_error_line(explain(path, image_file), str(path))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the checkpoint's pickle ran"))


def test_an_official_pth_whose_pickle_runs_code_is_refused(tmp_path, image_file):
    path, marker = tmp_path / "albef.pth", tmp_path / "MARKER"
    torch.save({"model": {"temp": torch.tensor(0.07)}, "evil": _Payload(marker)}, path)
    refused(path, str(path))
    one_error_line(explain(path, image_file), str(path))
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(hostile_weights(b"x" * 100)))
def test_hostile_official_safetensors_is_one_line(tokenizer, tmp_path, kind):
    path = tmp_path / "albef.safetensors"
    save_file(tiny_albef(len(tokenizer)).state_dict(), str(path))
    path.write_bytes(hostile_weights(path.read_bytes())[kind])
    refused(path, str(path))


def malformed_tokenizers(good: dict) -> dict[str, str]:
    model = good["model"]
    return {
        "invalid JSON": json.dumps(good)[:-40],
        "empty": "",
        "a list": json.dumps([good]),
        "no model": json.dumps({k: v for k, v in good.items() if k != "model"}),
        "model a number": json.dumps(dict(good, model=7)),
        "vocab a string": json.dumps(dict(good, model=dict(model, vocab="abc"))),
        "ids strings": json.dumps(
            dict(good, model=dict(model, vocab={k: str(v) for k, v in model["vocab"].items()}))
        ),
        "added_tokens a string": json.dumps(dict(good, added_tokens="x")),
    }


@pytest.mark.parametrize("kind", list(malformed_tokenizers({"model": {"vocab": {}}})))
@pytest.mark.parametrize("family", ["albef", "clip"])
def test_malformed_tokenizer_json_names_the_file(tiny_model_dir, clip_dir, tmp_path, family, kind):
    folder = copy(tiny_model_dir if family == "albef" else clip_dir, tmp_path)
    file = folder / "tokenizer.json"
    file.write_text(malformed_tokenizers(json.loads(file.read_text()))[kind])
    refused(folder, str(file))


def test_malformed_tokenizer_json_on_the_command_line_exit_2(tiny_model_dir, tmp_path, image_file):
    folder = copy(tiny_model_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": 3}}')
    one_error_line(explain(folder, image_file), str(folder / "tokenizer.json"))


BAD_SIZES = [
    ("vision_width", "32"),
    ("hidden_size", 0),
    ("vision_depth", -2),
    ("image_size", [64, 64]),
    ("text_heads", 1.5),
    ("intermediate_size", True),
    ("vocab_size", None),
    ("fusion_layer", -1),
    ("temp", "hot"),
    ("temp", 0),
    ("dropout", 1.5),
    ("text_eps", -1e-12),
]


@pytest.mark.parametrize(("key", "value"), BAD_SIZES)
def test_an_albef_config_with_impossible_sizes_names_file_and_key(
    tiny_model_dir, tmp_path, image_file, key, value
):
    folder = copy(tiny_model_dir, tmp_path)
    edit_json(folder / "config.json", **{key: value})
    refused(folder, str(folder / "config.json"), key)
    one_error_line(explain(folder, image_file), str(folder / "config.json"), key)


def test_a_deeply_nested_config_is_one_line(tiny_model_dir, tmp_path):
    folder = copy(tiny_model_dir, tmp_path)
    deep = json.loads((folder / "config.json").read_text())
    node = deep
    for _ in range(800):  # deeper than a recursive scan could walk, shallower than json's limit
        node["x"] = {}
        node = node["x"]
    (folder / "config.json").write_text(json.dumps(deep))
    assert gc.load(folder).family == "albef"
    node["auto_map"] = {"AutoConfig": "payload.X"}
    (folder / "config.json").write_text(json.dumps(deep))
    refused(folder, "'auto_map'")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(folder, str(folder / "config.json"))


@pytest.mark.parametrize("file", ["tokenizer_config.json", "processor_config.json"])
def test_a_broken_config_file_transformers_reads_is_named(clip_dir, tmp_path, file):
    folder = copy(clip_dir, tmp_path)
    (folder / file).write_text('{"processor_class": ')
    refused(folder, str(folder / file), "not valid JSON")


def test_a_json_file_of_the_users_own_is_left_alone(tiny_model_dir, tmp_path):
    folder = copy(tiny_model_dir, tmp_path)
    (folder / "my_run_config.json").write_text("not json: notes from training")
    assert gc.load(folder).family == "albef"


def test_an_albef_config_that_is_not_an_object_or_not_json(tiny_model_dir, tmp_path):
    folder = copy(tiny_model_dir, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    refused(folder, str(folder / "config.json"), "JSON object")
    (folder / "config.json").write_bytes(b'{"model_type": "albef", \xff}')
    refused(folder, str(folder / "config.json"), "not valid JSON")


@pytest.mark.parametrize(
    "text",
    [
        '{"model_type": "clip", "text_config": {',
        '{"model_type": "no-such-model"}',
        '"clip"',
        '{"model_type": "clip", "architectures": 5}',
    ],
)
def test_a_broken_transformers_config_names_the_file(clip_dir, tmp_path, image_file, text):
    folder = copy(clip_dir, tmp_path)
    (folder / "config.json").write_text(text)
    refused(folder, str(folder / "config.json"))
    one_error_line(explain(folder, image_file), str(folder / "config.json"))


@pytest.mark.parametrize(
    ("part", "key", "value"),
    [("text_config", "hidden_size", "32"), ("vision_config", "num_hidden_layers", -1)],
)
def test_a_transformers_config_with_impossible_sizes_names_file_and_key(
    clip_dir, tmp_path, part, key, value
):
    folder = copy(clip_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[part][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, str(folder / "config.json"), key)


# ------------------------------------------------------------- a model too large for the machine
def test_albef_parameters_are_counted_from_the_config_alone(tokenizer):
    for overrides in ({}, {"fusion_layer": 2, "vision_depth": 3, "embed_dim": 8}):
        model = tiny_albef(len(tokenizer), **overrides)
        assert model.config.parameters() == sum(p.numel() for p in model.parameters())
    assert 200e6 < AlbefConfig().parameters() < 220e6  # the released ViT-B/16 + BERT-base ALBEF


def test_the_transformers_estimate_is_close_to_the_real_count(clip_dir):
    config = json.loads((clip_dir / "config.json").read_text())
    real = sum(p.numel() for p in CLIPModel.from_pretrained(clip_dir).parameters())
    assert abs(model_files.estimate_parameters(config, clip_dir) - real) < 0.1 * real


def forbid_building(monkeypatch) -> None:
    """From now on, fail the test if a model is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was allocated")

    monkeypatch.setattr(AlbefModel, "__init__", refuse)
    monkeypatch.setattr(CLIPModel, "__init__", refuse)


@pytest.fixture()
def never_built(monkeypatch):
    forbid_building(monkeypatch)


# about 12.9 billion parameters: 51.5 GB in float32
HUGE_ALBEF = dict(vision_width=8192, vision_mlp=32768, hidden_size=8192, intermediate_size=32768)
HUGE_ALBEF |= dict(vision_depth=7, text_layers=8, fusion_layer=6, vision_heads=64, text_heads=64)


def test_a_51_gb_albef_config_is_refused_before_allocating(
    tiny_model_dir, tmp_path, image_file, monkeypatch, never_built
):
    monkeypatch.delenv(model_files.MAX_MODEL_ENV, raising=False)
    monkeypatch.setattr(model_files, "max_model_bytes", lambda: 32 * 10**9)
    folder = copy(tiny_model_dir, tmp_path)
    edit_json(folder / "config.json", **HUGE_ALBEF)
    need = AlbefConfig.from_dict(json.loads((folder / "config.json").read_text())).parameters()
    assert 50e9 < need * 4 < 53e9
    text = refused(folder, str(folder / "config.json"), f"{need * 4 / 1e9:.3g} GB", "32 GB")
    assert model_files.MAX_MODEL_ENV in text
    one_error_line(explain(folder, image_file), str(folder / "config.json"), "GB")


def test_a_huge_transformers_config_is_refused_before_allocating(clip_dir, tmp_path, never_built):
    folder = copy(clip_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=48)
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, str(folder / "config.json"), "billion parameters", "refused before allocating")


def test_the_limit_is_physical_memory_unless_the_variable_says(tiny_model_dir, monkeypatch):
    monkeypatch.delenv(model_files.MAX_MODEL_ENV, raising=False)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert model_files.max_model_bytes() == memory
    monkeypatch.setenv(model_files.MAX_MODEL_ENV, "0.0001")  # 100 kB: less than the tiny model
    assert model_files.max_model_bytes() == 100_000
    refused(tiny_model_dir, "0.0001 GB allowed")
    monkeypatch.setenv(model_files.MAX_MODEL_ENV, "0.01")
    assert gc.load(tiny_model_dir).family == "albef"
    for bad in ("lots", "-1", "0", "nan"):
        monkeypatch.setenv(model_files.MAX_MODEL_ENV, bad)
        refused(tiny_model_dir, model_files.MAX_MODEL_ENV, "positive number")


# ------------------------------------------------------------- 15. no progress bars
def test_loading_writes_no_progress_bar_and_restores_the_setting(clip_dir, capfd, monkeypatch):
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    logging.enable_progress_bar()
    seen = []  # the hub's download bars during the load: left on
    monkeypatch.setattr(
        CLIPModel, "from_pretrained", spy(CLIPModel.from_pretrained, seen, hub, logging)
    )
    gc.load(clip_dir)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert seen == [(False, True)]
    assert logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    logging.disable_progress_bar()
    gc.load(clip_dir)
    assert not logging.is_progress_bar_enabled()
    logging.enable_progress_bar()


def spy(load, seen: list, hub, logging):
    """`load`, recording (transformers' bars on, the hub's on) at each call."""

    def wrapped(*args, **kwargs):
        seen.append((logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()))
        return load(*args, **kwargs)

    return wrapped


def test_the_command_line_writes_no_progress_bar(clip_dir, image_file):
    r = explain(clip_dir, image_file)
    assert r.exit_code == 0, r.output
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr


# ------------------------------------------------------------- the captioner's own format
@pytest.fixture()
def captioner_dir(tmp_path) -> Path:
    from groundcam.zoo import builtin_path

    return copy(builtin_path("captioner-tiny-shapes"), tmp_path, "captioner")


@pytest.mark.parametrize(
    ("key", "value"),
    [("embed_dim", "512"), ("decoder_dim", 0), ("attention_dim", -3), ("max_length", 2.5)],
)
def test_a_captioner_config_with_impossible_sizes_names_file_and_key(captioner_dir, key, value):
    edit_json(captioner_dir / "config.json", **{key: value})
    refused(captioner_dir, str(captioner_dir / "config.json"), key)


def test_a_captioner_encoder_with_impossible_sizes_names_file_and_key(captioner_dir):
    config = json.loads((captioner_dir / "config.json").read_text())
    config["encoder_config"]["hidden_sizes"] = ["48", 96]
    (captioner_dir / "config.json").write_text(json.dumps(config))
    refused(captioner_dir, str(captioner_dir / "config.json"), "hidden_sizes")


def test_a_huge_captioner_is_refused_before_allocating(captioner_dir, monkeypatch):
    from groundcam.models.captioner import ShowAttendTell

    def refuse(*args, **kwargs):
        raise AssertionError("a model was allocated")

    monkeypatch.setattr(ShowAttendTell, "__init__", refuse)
    edit_json(captioner_dir / "config.json", decoder_dim=1_000_000, embed_dim=1_000_000)
    refused(captioner_dir, str(captioner_dir / "config.json"), "refused before allocating")


@pytest.mark.parametrize("kind", ["empty", "header length 2^62", "4 TB shape"])
def test_hostile_captioner_weights_are_one_line(captioner_dir, kind):
    weights = captioner_dir / "model.safetensors"
    weights.write_bytes(hostile_weights(weights.read_bytes())[kind])
    refused(captioner_dir, str(weights))


# ------------------------------------------------------------- configs transformers refuses
def edit_clip_config(folder: Path, part: str | None, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (config[part] if part else config).update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("part", "changes", "needle"),
    [
        (None, {"text_config": "x"}, "text_config"),
        ("text_config", {"layer_norm_eps": "tiny"}, "layer_norm_eps"),
        ("vision_config", {"num_attention_heads": 5}, "attention heads"),
        (None, {"dtype": "evil"}, "evil"),
    ],
)
def test_a_config_transformers_cannot_use_is_one_line_naming_it(
    clip_dir, tmp_path, image_file, part, changes, needle
):
    folder = copy(clip_dir, tmp_path)
    edit_clip_config(folder, part, **changes)
    refused(folder, str(folder / "config.json"), needle)
    one_error_line(explain(folder, image_file), str(folder / "config.json"), needle)


def test_weights_that_do_not_fit_the_config_are_one_line_not_a_table(
    clip_dir, tmp_path, image_file, tokenizer
):
    """transformers logs a table of mismatched tensors before failing; the table becomes part
    of the one line instead."""
    folder = copy(clip_dir, tmp_path)
    edit_clip_config(folder, "text_config", vocab_size=1000)
    line = one_error_line(explain(folder, image_file), str(folder), "do not fit config.json")
    assert f"[{len(tokenizer)}, 32] in the weights file but [1000, 32] by the config" in line
    assert "token_embedding" in line


def test_an_official_checkpoint_whose_keys_describe_a_huge_model_is_refused(
    tokenizer, tmp_path, monkeypatch
):
    """Depths are counted from key names: twenty thousand one-number `norm1` tensors describe
    twenty thousand vision blocks, about 1 GB, from a file of a few hundred kB."""
    state = {k: v.contiguous() for k, v in tiny_albef(len(tokenizer)).state_dict().items()}
    state |= {f"visual_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(2, 20_000)}
    path = tmp_path / "albef.safetensors"
    save_file(state, str(path))
    monkeypatch.setenv(model_files.MAX_MODEL_ENV, "0.5")
    forbid_building(monkeypatch)
    with pytest.raises(InputError, match="refused before allocating") as e:
        gc.load(path, num_heads=4, text_num_heads=4)
    assert str(path) in str(e.value) and "0.5 GB allowed" in str(e.value)


def test_loads_in_threads_leave_transformers_logging_and_bars_as_they_were(clip_dir, tmp_path):
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    before = (list(logger.handlers), logger.propagate)
    hf_logging.enable_progress_bar()
    broken = copy(clip_dir, tmp_path)
    edit_clip_config(broken, "text_config", vocab_size=1000)

    def load(folder):
        try:
            return gc.load(folder).family
        except InputError as e:
            return str(e)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(load, [clip_dir, broken, clip_dir, broken]))
    assert results[0] == results[2] == "clip"
    assert "do not fit config.json" in results[1] and "do not fit config.json" in results[3]
    assert (list(logger.handlers), logger.propagate) == before
    assert hf_logging.is_progress_bar_enabled()


def test_every_from_pretrained_in_the_source_passes_trust_remote_code_false():
    """transformers' loaders are called with `trust_remote_code=False` (in
    `groundcam.model_files.pretrained` and the hub's config), never bare; the other
    `from_pretrained` calls are groundcam's own (adapters, AlbefModel, ShowAttendTell)."""
    import ast

    own = {"AlbefModel", "ShowAttendTell", "SCAN", "adapter_class"}
    calls = []
    for path in sorted((ROOT / "src" / "groundcam").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "from_pretrained":
                continue
            receiver = node.func.value
            name = getattr(receiver, "id", None) or getattr(
                getattr(receiver, "func", None), "id", None
            )
            trusted = [k for k in node.keywords if k.arg == "trust_remote_code"]
            safe = (
                trusted
                and isinstance(trusted[0].value, ast.Constant)
                and trusted[0].value.value is False
            )
            calls.append((path.name, node.lineno, name))
            assert name in own or safe, (
                f"{path}:{node.lineno} calls from_pretrained without trust_remote_code=False"
            )
    assert ("model_files.py", "cls") in {(file, name) for file, _, name in calls}


# ------------------------------------------------------------- SCAN's own format
@pytest.fixture()
def scan_dir(tmp_path) -> Path:
    from groundcam.zoo import builtin_path

    return copy(builtin_path("scan-tiny-shapes"), tmp_path, "scan")


@pytest.mark.parametrize(
    ("key", "value"),
    [("embed_size", "128"), ("word_dim", 0), ("img_dim", -3), ("num_layers", 2.5)],
)
def test_a_scan_config_with_impossible_sizes_names_file_and_key(scan_dir, key, value):
    edit_json(scan_dir / "config.json", **{key: value})
    refused(scan_dir, str(scan_dir / "config.json"), key)


def test_a_huge_scan_is_refused_before_allocating(scan_dir, monkeypatch):
    from groundcam.models.scan import SCAN

    def refuse(*args, **kwargs):
        raise AssertionError("a model was allocated")

    monkeypatch.setattr(SCAN, "__init__", refuse)
    edit_json(scan_dir / "config.json", embed_size=1_000_000, word_dim=1_000_000)
    refused(scan_dir, str(scan_dir / "config.json"), "refused before allocating")


@pytest.mark.parametrize("kind", ["empty", "header length 2^62", "4 TB shape"])
def test_hostile_scan_weights_are_one_line(scan_dir, kind):
    weights = scan_dir / "model.safetensors"
    weights.write_bytes(hostile_weights(weights.read_bytes())[kind])
    refused(scan_dir, str(weights))


def test_scan_parameter_count_is_exact():
    import groundcam as gc_

    model = gc_.load("scan-tiny-shapes").model
    assert model.config.parameters() == sum(p.numel() for p in model.parameters())
