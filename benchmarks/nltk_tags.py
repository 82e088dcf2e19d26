"""NLTK's tag of each word alone, as TAM's `eval.py` asks for it (`nltk.pos_tag([word])`), for
`benchmarks/word_classes.py`. Runs ONLY in a scratch environment with `nltk` installed; groundcam
itself never imports NLTK.

    python3 -m venv /tmp/nltk-venv && /tmp/nltk-venv/bin/pip install nltk
    /tmp/nltk-venv/bin/python benchmarks/nltk_tags.py words.json nltk_tags.json \
        --pickle averaged_perceptron_tagger/averaged_perceptron_tagger.pickle

The tagger TAM downloads (`averaged_perceptron_tagger`, a pickle in the nltk_data repository) is
on no package registry; NLTK >= 3.9 reads it as JSON (`averaged_perceptron_tagger_eng`).
`--pickle` converts the pickle into those JSON files under `--data` through an unpickler that
admits `set` alone (the only global the file holds), then tags with `nltk.pos_tag`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

NAME = "averaged_perceptron_tagger_eng"
FUNCTION_TAGS = {"CC", "DT", "EX", "MD", "POS", "PRP", "PRP$", "UH", "WDT", "WP", "WP$", "WRB"}


class _OnlySet(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in {("__builtin__", "set"), ("builtins", "set")}:
            return set
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def convert(pickle_path: Path, data: Path) -> str:
    """Write NLTK's JSON tagger files from the old pickle; returns the pickle's sha256."""
    raw = pickle_path.read_bytes()
    weights, tagdict, classes = _OnlySet(io.BytesIO(raw), encoding="latin1").load()
    out = data / "taggers" / NAME
    out.mkdir(parents=True, exist_ok=True)
    for attr, obj in (("weights", weights), ("tagdict", tagdict), ("classes", sorted(classes))):
        (out / f"{NAME}.{attr}.json").write_text(json.dumps(obj))
    return hashlib.sha256(raw).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("words", type=Path, help="word_classes.py --words output")
    ap.add_argument("out", type=Path)
    ap.add_argument("--pickle", type=Path, help="averaged_perceptron_tagger.pickle to convert")
    ap.add_argument("--data", type=Path, default=Path("/tmp/nltk-work/nltk_data"))
    args = ap.parse_args()
    digest = convert(args.pickle, args.data) if args.pickle else None
    os.environ["NLTK_DATA"] = str(args.data)
    import nltk

    nltk.data.path.insert(0, str(args.data))
    words = json.loads(args.words.read_text())["words"]
    tags = {w: nltk.pos_tag([w])[0][1] for w in words}
    tagger = nltk.tag.PerceptronTagger()
    function = sorted(w for w, t in tagger.tagdict.items() if t in FUNCTION_TAGS)
    check = nltk.pos_tag("The quick brown fox jumps over the lazy dog .".split())
    result = {
        "nltk": nltk.__version__,
        "tagger": "averaged_perceptron_tagger (nltk_data), read as " + NAME,
        "pickle_sha256": digest,
        "check": " ".join(f"{w}/{t}" for w, t in check),
        "tags": tags,
        # words the tagger always gives a function tag (its tag dictionary), for the list check
        "tagdict_function_words": {w: nltk.pos_tag([w])[0][1] for w in function},
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(tags))


if __name__ == "__main__":
    main()
