"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`):
a SigLIP-like vision tower whose patch grid is pixel-shuffled by `scale_factor`, and a Llama-style
decoder (`model.model.text_model`).

Tokens, as the processor writes them: an image the processor splits is resized so that both sides
are multiples of the tile size and cut into rows x cols tiles, each written
`<fake_token_around_image><row_r_col_c><image>×n` (a newline after each row of tiles), then the
whole image squashed to one tile, `<fake_token_around_image><global-img><image>×n`; an image that
fits one tile gets only the global image. `n = image_seq_len = (tile/patch)² / scale²`, an s x s
row-major grid after the pixel shuffle. The tiles are read from the markers in the input ids (the
processor's own record of its split): tile (r, c) covers `[c/cols, (c+1)/cols] x [r/rows,
(r+1)/rows]` of the original image, the global image all of it; `placement.place` takes the mean
where they overlap. Without a chat template the prompt is written
`User:<image>{prompt}<end_of_utterance>\\nAssistant:`, the Idefics3 conversation format."""

from __future__ import annotations

import re

import torch

from groundcam.adapters import hf
from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout

_MARKER = re.compile(r"row_(\d+)_col_(\d+)>?\s*$")


def runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """`positions` (sorted) cut into runs of consecutive positions."""
    if not len(positions):
        return []
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1)[:, 0] + 1
    return list(torch.tensor_split(positions, breaks))


class Idefics3Adapter(VlmAdapter):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    template = "User:{image}{prompt}<end_of_utterance>\nAssistant:"
    images_per_generation = 16  # a bound of this library; the context length is the model's

    def side(self) -> int:
        """Cells per side of one tile's grid after the pixel shuffle."""
        config = self.model.config
        vision = config.vision_config
        return vision.image_size // hf.patch_size(vision)[0] // config.scale_factor

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """Per image, its tiles (row-major, from the `<row_r_col_c>` markers) then the global
        image, each an s x s grid."""
        positions = self.image_positions(ids)
        s = self.side()
        tiles: list[Tile] = []
        cells: list[tuple[int, int]] = []  # (row, col) of the current image's tiles, 1-based
        end = 0
        for run in runs(positions):
            start = int(run[0])
            if len(run) != s * s:
                raise ValueError(
                    f"a run of {len(run)} image tokens at position {start}; a tile of this "
                    f"{self.family} model takes {s}x{s}"
                )
            before = ids[0, max(end, start - 16) : start].tolist()
            marker = _MARKER.search(self.tokenizer.decode(before, skip_special_tokens=False))
            end = int(run[-1]) + 1
            if marker:
                cells.append((int(marker[1]), int(marker[2])))
                continue
            image = len({t.image for t in tiles})
            rows = max((r for r, _ in cells), default=1)
            cols = max((c for _, c in cells), default=1)
            if cells and sorted(cells) != [
                (r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)
            ]:
                raise ValueError(f"image {image}: tiles {cells} do not form a {rows}x{cols} grid")
            for k, (r, c) in enumerate(cells):
                box = ((c - 1) / cols, (r - 1) / rows, c / cols, r / rows)
                tiles.append(Tile(image, k, s, s, box))
            tiles.append(Tile(image, len(cells), s, s))  # the global image
            cells = []
        count = len({t.image for t in tiles})
        if cells or count != len(sizes):
            raise ValueError(
                f"the image tokens form {count} image(s){' and loose tiles' if cells else ''} "
                f"for {len(sizes)} image(s)"
            )
        return TokenLayout.from_tiles(positions, tiles, tuple(tuple(hw) for hw in sizes))


class SmolVlmAdapter(Idefics3Adapter):
    family = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration",)
