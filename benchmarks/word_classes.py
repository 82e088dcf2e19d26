"""Word classes: groundcam's stand-in (closed function-word list + category names) against the
classes TAM's `eval.py` derives from NLTK's averaged perceptron tagger, on shapes captions.

TAM tags each word alone (`nltk.pos_tag([word])`): CC DT EX MD POS PRP PRP$ UH WDT WP WP$ WRB
are function words, NN NNS NNP NNPS nouns (a category when they name one), the rest "others".
groundcam never imports NLTK: the tags come from a JSON written in a scratch environment by
`benchmarks/nltk_tags.py`. Two steps:

    python benchmarks/word_classes.py --words /tmp/words.json          # the words to tag
    (scratch venv with nltk) python benchmarks/nltk_tags.py /tmp/words.json /tmp/nltk_tags.json
    python benchmarks/word_classes.py --tags /tmp/nltk_tags.json \
        --out benchmarks/results/word_classes.json

Measured: per-word agreement (confusion counts) on the reference captions (`groundcam data
shapes-captions` writes the same left-to-right captions) and on the model's greedy captions,
and TAM's Obj-IoU / Func-IoU / F1-IoU of the model's captions with either set of classes fed
to `word_ious`. The category match (a noun equal to a category word after singularisation) is
groundcam's in both: WordNet's data is not on PyPI either, and no shapes word is a plural.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

import groundcam as gc
from groundcam.eval.caption_pointing import shapes_samples
from groundcam.eval.localisation import (
    FUNCTION_WORDS,
    group_words,
    lemma_candidates,
    summarise_word_ious,
    token_pieces,
    word_class,
    word_ious,
)

FUNCTION_TAGS = {"CC", "DT", "EX", "MD", "POS", "PRP", "PRP$", "UH", "WDT", "WP", "WP$", "WRB"}
NOUN_TAGS = {"NN", "NNS", "NNP", "NNPS"}


def tam_class(word: str, tag: str, categories: dict[str, int]) -> int | str | None:
    """TAM's class of a word from its tag: a category id for a noun naming a category (the last
    match, as TAM's loop keeps), "noun", "function", or None for its "others"."""
    if tag in FUNCTION_TAGS:
        return "function"
    if tag not in NOUN_TAGS:
        return None
    found: int | str = "noun"
    for name, category in categories.items():
        if lemma_candidates(word) & {w.replace("-", "") for w in name.lower().split()}:
            found = category
    return found


def kind(cls: int | str | None) -> str:
    """A class as a confusion-table label."""
    return "category" if isinstance(cls, int) else (cls or "other")


def caption_words(caption: str) -> list[str]:
    """A caption's words as TAM groups them (spaces and punctuation break words)."""
    return [w for w, _ in group_words(list(caption))]


def generate(explainer, samples: list, method: str) -> list[dict]:
    """Per scene: the greedy caption's words, their token maps and the scene's category mask."""
    out = []
    for s in samples:
        gen = explainer.explain_generation(s.load_image(), method=method)
        words = group_words(token_pieces(explainer.decode, gen.token_ids))
        maps = gen.maps.numpy()
        labels, categories = s.labels()
        out.append(
            {
                "words": [w for w, _ in words],
                "maps": [[maps[k] for k in ks] for _, ks in words],
                "labels": labels,
                "categories": categories,
                "reference": caption_words(s.references[0]),
            }
        )
    return out


def confusion(pairs: list[tuple[str, str, str]]) -> dict:
    """Counts of (ours, TAM's) per word occurrence, and the words on which they differ."""
    table: dict[str, Counter] = {}
    differ: dict[str, dict] = {}
    for word, ours, theirs in pairs:
        table.setdefault(ours, Counter())[theirs] += 1
        if ours != theirs:
            d = differ.setdefault(word, {"ours": ours, "tam": theirs, "count": 0})
            d["count"] += 1
    agree = sum(n for o, row in table.items() for t, n in row.items() if o == t)
    return {
        "words": len(pairs),
        "agree": agree,
        "agreement": agree / len(pairs) if pairs else None,
        "confusion": {o: dict(sorted(row.items())) for o, row in sorted(table.items())},
        "differ": dict(sorted(differ.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="captioner-tiny-shapes")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--words", type=Path, help="write the words to tag here and stop")
    ap.add_argument("--tags", type=Path, help="nltk_tags.py's JSON: {'tags': {word: tag}, ...}")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not args.words and not args.tags:
        ap.error("give --words (first step) or --tags (second step)")
    torch.set_num_threads(args.threads)
    explainer = gc.load(args.model)
    samples = list(shapes_samples(args.split, args.scenes, args.seed))
    t0 = time.time()
    methods = ("attention",) if args.words else ("attention", "gradcam")
    runs = {m: generate(explainer, samples, m) for m in methods}
    seconds = round(time.time() - t0, 1)
    scenes = runs["attention"]  # greedy captions: the same words whatever the method
    if args.words:
        words = sorted({w for r in scenes for w in r["words"] + r["reference"]} | FUNCTION_WORDS)
        args.words.write_text(json.dumps({"words": words}, indent=1) + "\n")
        print(f"{len(words)} words to tag written to {args.words}")
        return
    tagged = json.loads(args.tags.read_text())
    tags = tagged["tags"]
    needed = {w for r in scenes for w in r["words"] + r["reference"]} | FUNCTION_WORDS
    missing = sorted(needed - tags.keys())
    if missing:
        raise SystemExit(f"--tags {args.tags}: no tag for {missing}; rerun step one and tag them")
    result: dict = {
        "model": args.model,
        "split": args.split,
        "scenes": args.scenes,
        "seed": args.seed,
        "tagger": {k: v for k, v in tagged.items() if k not in ("tags", "tagdict_function_words")},
        "tags": tags,
        "seconds_for_maps": seconds,
    }
    listed = {w: tags[w] for w in sorted(FUNCTION_WORDS) if w in tags}
    extra = tagged.get("tagdict_function_words", {})
    result["function_word_list"] = {
        "listed": len(listed),
        "nltk_function": sum(t in FUNCTION_TAGS for t in listed.values()),
        "listed_but_not_function": {w: t for w, t in listed.items() if t not in FUNCTION_TAGS},
        "function_in_tagdict_not_listed": {
            w: t for w, t in extra.items() if w.lower() not in FUNCTION_WORDS
        },
    }
    for key in ("reference", "words"):
        pairs = [
            (w, kind(word_class(w, r["categories"])), kind(tam_class(w, tags[w], r["categories"])))
            for r in scenes
            for w in r[key]
        ]
        result[f"{'reference' if key == 'reference' else 'generated'}_captions"] = confusion(pairs)
    for method, rows in runs.items():
        block = {}
        for name, classify in (
            ("groundcam", lambda w, c: word_class(w, c)),
            ("nltk", lambda w, c: tam_class(w, tags[w], c)),
        ):
            ious = [
                word_ious(
                    r["maps"], [classify(w, r["categories"]) for w in r["words"]], r["labels"]
                )
                for r in rows
            ]
            block[name] = summarise_word_ious(ious)
        block["difference"] = {
            k: block["nltk"][k] - block["groundcam"][k]
            for k in ("Obj-IoU", "Func-IoU", "F1-IoU")
            if block["nltk"][k] is not None and block["groundcam"][k] is not None
        }
        result[method] = block
        g, n = block["groundcam"], block["nltk"]
        print(
            f"{method:>9}: groundcam classes Obj {g['Obj-IoU']:.4f} Func {g['Func-IoU']:.4f} "
            f"F1 {g['F1-IoU']:.4f} | NLTK classes Obj {n['Obj-IoU']:.4f} "
            f"Func {n['Func-IoU']:.4f} F1 {n['F1-IoU']:.4f}"
        )
    f = result["function_word_list"]
    print(
        f"function-word list: {f['nltk_function']}/{f['listed']} tagged as function words alone; "
        f"listed but not: {f['listed_but_not_function']}; tagged function, not listed: "
        f"{sorted(f['function_in_tagdict_not_listed'])}"
    )
    for key in ("reference_captions", "generated_captions"):
        c = result[key]
        print(f"{key}: {c['agree']}/{c['words']} words agree; differ: {c['differ']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
