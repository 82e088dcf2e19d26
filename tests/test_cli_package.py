"""The command line as a package: every verb of the former one-file cli.py is still registered
with its options, each verb group's code lives in the module named for it, and the shared
options module keeps turning bad input into one line (exit 2) for every verb."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import groundcam.cli
from groundcam.cli import main
from groundcam.eval.datasets import DATASETS

ROOT = Path(__file__).resolve().parents[1]

# Each verb of cli.py before the split, with the options it had then (new ones may be added).
VERBS = {
    "caption": "--model --method --layer --max-new-tokens --text --beam --prompt --out --format "
    "--dpi --style --full-res --cmap --alpha --device --json",
    "data shapes-captions": "--out --train --val --test --compositional --seed --image-size",
    "demo": "--out --model --scenes --device",
    "eval captions": "--model --dataset --split --scenes --seed --image-size --captions --images "
    "--method --layer --beam --max-new-tokens --metrics --device --out",
    "eval glyphs": "--split --lines --model --method --layer --seed --device --out",
    "eval retrieval": "--model --dataset --captions --images --split --limit --scenes --seed "
    "--image-size --k-test --batch --threads --device --out",
    "eval sanity": "--model --dataset --scenes --seed --methods --variants --data-model --device "
    "--out",
    "explain": "--model --method --layer --target --prompt --out --box --protocol --triptych "
    "--format --dpi --style --full-res --cmap --alpha --device --json",
    "models": "",
    "serve": "--model --host --port --max-upload-mb --max-phrases --max-tokens --max-new-tokens "
    "--workers --cache-mb --cache-ttl --files-mb --sessions --device",
    "train albef": "--out --steps --batch-size --lr --seed --pool --eval-every --threads "
    "--grad-accum --precision",
    "train amc": "--out --model --data --root --images --split --tokenizer --steps --batch-size "
    "--grad-accum --lr --final-lr --warmup --weight-decay --map-method --layer --no-amc "
    "--mean-weight --max-weight --precision --seed --pool --eval-every --save-every --threads",
    "train captioner": "--captions --images --out --encoder --freeze-encoder --finetune-encoder "
    "--image-size --embed-dim --attention-dim --decoder-dim --dropout --attention-regularizer "
    "--min-word-count --max-words --epochs --batch-size --lr --seed --beam --val-images "
    "--sample-every --ground --ground-weight --threads --grad-accum --precision",
    "train scan": "--out --steps --batch-size --lr --seed --pool --eval-every --save-every "
    "--all-negatives-steps --threads --grad-accum --precision",
    "train trocr": "--out --steps --batch-size --lr --aux-weight --seed --pool --eval-every "
    "--threads --grad-accum --precision",
    "train vlm": "--out --steps --batch-size --lr --warmup --seed --pool --scene-size --image-size "
    "--patch-size --vision-hidden --vision-layers --hidden --layers --heads --caption-share "
    "--val-scenes --eval-every --save-every --threads --grad-accum --precision",
}
# Every dataset's pointing evaluation and layer sweep share these (the dataset adds its own).
EVAL_DATASET = "--split --model --method --layer --target --protocol --metrics --steps --dets "
EVAL_DATASET += "--precision --threads --batch-images --device --out --report --examples"
SWEEP_DATASET = "--split --model --method --target --protocol --metrics --steps --dets "
SWEEP_DATASET += "--precision --threads --batch-images --device --layers --out"

# The module that holds each top-level verb (a group's subcommands live with it).
HOME = {
    "caption": "explain",
    "data": "data",
    "demo": "demo",
    "eval": "evaluate",
    "explain": "explain",
    "models": "models",
    "serve": "serve",
    "sweep-layers": "evaluate",
    "train": "train",
}


def commands(group: click.Group = main, path: tuple[str, ...] = ()):
    """(path, command) of every command under `group`, groups included."""
    for name in sorted(group.commands):
        cmd = group.commands[name]
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path + (name,))


def leaves() -> dict[str, click.Command]:
    return {" ".join(p): c for p, c in commands() if not isinstance(c, click.Group)}


def option_names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def expected_verbs() -> dict[str, str]:
    verbs = dict(VERBS)
    for name in DATASETS:
        verbs[f"eval {name}"] = EVAL_DATASET
        verbs[f"sweep-layers {name}"] = SWEEP_DATASET
    return verbs


def test_every_verb_of_the_old_file_is_registered_with_its_options():
    found = leaves()
    expected = expected_verbs()
    assert sorted(set(expected) - set(found)) == []
    for path, options in expected.items():
        missing = set(options.split()) - option_names(found[path])
        assert not missing, (path, sorted(missing))
    assert set(main.commands) == set(HOME)


def test_the_entry_points_run_the_package_group():
    pyproject = (ROOT / "pyproject.toml").read_text()
    script = re.search(r'\[project\.scripts\]\ngroundcam = "([\w.:]+)"', pyproject)
    module, _, attr = script.group(1).partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    assert isinstance(main, click.Group) and main.name == "groundcam"
    assert "from groundcam.cli import main" in (ROOT / "src/groundcam/__main__.py").read_text()
    assert (ROOT / "src/groundcam/cli/__main__.py").is_file()
    assert not (ROOT / "src/groundcam/cli.py").exists()


def test_each_verb_group_module_defines_its_verbs():
    for path, cmd in commands():
        home = f"groundcam.cli.{HOME[path[0]]}"
        assert cmd.callback.__module__ == home, (" ".join(path), cmd.callback.__module__)
    modules = {p.stem for p in (ROOT / "src/groundcam/cli").glob("*.py")}
    assert set(HOME.values()) | {"options", "__init__", "__main__"} == modules
    # the shared module holds the root group and no verb
    assert groundcam.cli.options.main is main


@pytest.mark.parametrize(
    "path", sorted(p for p, c in leaves().items() if "--device" in option_names(c))
)
def test_every_verb_refuses_a_bad_device_in_one_line(path):
    r = CliRunner().invoke(main, [*path.split(), "--device", "nonsense"])
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "groundcam: error: --device nonsense: not a device; use cpu, cuda, cuda:N or mps"
    ]


def test_usage_errors_of_every_group_are_one_line():
    for group in ("data", "eval", "sweep-layers", "train"):
        r = CliRunner().invoke(main, [group, "no-such-verb"])
        assert r.exit_code == 2, (group, r.output)
        line = r.stderr.strip()
        assert line.startswith("groundcam: error: No such command 'no-such-verb'."), line
        assert line.endswith(f"(see 'groundcam {group} --help')") and "\n" not in line, line
