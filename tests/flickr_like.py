"""A Flickr30k Entities directory in the raw release format, written from synthetic shapes scenes,
so the evaluation runner can be tested at a size the shared fixtures do not reach."""

from __future__ import annotations

from pathlib import Path

from groundcam.data.shapes import generate_scene


def write_flickr_like(
    root: Path,
    n_images: int,
    split: str = "test",
    seed: int = 0,
    missing_images: tuple[int, ...] = (),
    malformed_xml: tuple[int, ...] = (),
    malformed_line: tuple[int, ...] = (),
    captions: int = 1,
    image_size: int = 128,
) -> Path:
    """`root/{Annotations,Sentences,flickr30k_images}` and `root/<split>.txt` for `n_images`
    scenes; `captions` sentence lines each naming every object once (about 3.5 phrases a line),
    one chain (with a 1-based box) per object. Image `i` is left out, given broken XML, or
    given a broken sentence line when listed."""
    for sub in ("Annotations", "Sentences", "flickr30k_images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_images):
        scene = generate_scene("val", i, seed, image_size)
        image_id = str(3000000000 + i)
        ids.append(image_id)
        if i not in missing_images:
            scene.image.save(root / "flickr30k_images" / f"{image_id}.jpg", quality=95)
        objects = []
        for chain, obj in enumerate(scene.meta["objects"], 1):
            x1, y1, x2, y2 = (int(v) + 1 for v in obj["box"])
            objects.append(
                f"<object><name>{chain}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            )
        width, height = scene.image_size
        xml = (
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{''.join(objects)}</annotation>"
        )
        if i in malformed_xml:
            xml = xml.replace("</size>", "")
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        mentions = [
            f"[/EN#{p.meta['target'] + 1}/other {p.text}]"
            for p in scene.phrases
            if p.kind == "attribute"
        ]
        openings = ("Here are", "We see", "A picture of", "There is", "Look at")
        lines = [
            f"{openings[c % len(openings)]} {' and '.join(mentions)} ." for c in range(captions)
        ]
        if i in malformed_line:
            lines.append("[/EN#1/other an unclosed phrase is here .")
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
