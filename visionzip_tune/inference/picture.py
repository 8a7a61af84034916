"""Which patches VisionZip keeps, as a picture (what ``python -m visionzip_tune show`` draws).

The model runs one forward pass on the image (and/or video) exactly as inference does, and every zip its VisionZip code
computes is recorded (``families.recorded_zips``): the pixels each unit's tower saw (an image, each anyres crop, each
video frame) and its :class:`~visionzip_tune.algorithm.compress.ZipResult`. Each unit is drawn as it entered the tower,
with its patch grid: dominant patches outlined, each contextual group (the patches merged into one token) filled with
its own colour, and beside it the attention score of every patch as a heat map; units follow one another top to bottom.
With a CLS tower, CLS is always one of the dominant tokens and is not a patch, so it is not drawn.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from visionzip_tune.algorithm.compress import DOMINANT, DROPPED

OUTLINE = (255, 255, 0)  # dominant patches
GRID = (40, 40, 40)  # every other patch's border
DROPPED_SHADE = (0, 0, 0)  # patches neither kept nor merged (contextual = 0)
FILL_ALPHA = 0.45  # opacity of a contextual group's colour over the image
HEADER = 18  # pixels of caption above each unit
GAP = 8  # pixels between units and between the image row and the heat map row
UNIT_PIXELS = 336  # a unit is drawn about this wide
CHAR_PIXELS = 6  # width of a caption character in PIL's default font


class Unit(NamedTuple):
    """One zipped unit, per patch in raster order: its pixels (S, S, 3) uint8, group (DOMINANT, DROPPED or the
    contextual token's index) and score."""

    caption: str
    pixels: np.ndarray
    groups: np.ndarray
    scores: np.ndarray


class Layout(NamedTuple):
    """Where units land in the picture: one row per unit (a caption, then the image with its heat map beside it),
    top to bottom in the order the model zipped them (crops, frames)."""

    side: int  # patches per unit edge
    cell: int  # pixels per patch

    @property
    def size(self) -> int:
        """Pixels per unit edge."""
        return self.side * self.cell

    def row_top(self, unit: int) -> int:
        return unit * (HEADER + self.size + GAP)

    def cell_origin(self, unit: int, patch: int, heat_map: bool = False) -> tuple[int, int]:
        """Top-left pixel (x, y) of ``patch`` (raster index) of unit ``unit``, in its image or its heat map."""
        x = (self.size + GAP if heat_map else 0) + (patch % self.side) * self.cell
        y = self.row_top(unit) + HEADER + (patch // self.side) * self.cell
        return x, y


def units_of(recorded, image_processor) -> list[Unit]:
    """Every recorded unit as drawn: pixels un-normalised with the image processor's mean and std."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    units = []
    for call, zipped in enumerate(recorded):
        result = zipped.result
        positions = result.groups.shape[1]
        has_cls = math.isqrt(positions) ** 2 != positions  # the patches of a unit are a square grid
        for b in range(zipped.pixel_values.shape[0]):
            pixels = (zipped.pixel_values[b].float().cpu() * std + mean).clamp(0, 1).mul(255).round()
            groups = result.groups[b, int(has_cls) :].cpu().numpy()
            kept = int((groups == DOMINANT).sum())
            merged = result.contextual_indices.shape[1]
            prefix = f"zip {call}, " if len(recorded) > 1 else ""
            cls = " + CLS" if has_cls and int(result.groups[b, 0]) == DOMINANT else ""
            caption = f"{prefix}unit {b}: {kept} patches{cls}, {merged} groups"
            # A compressor that scores nothing (random, pool, divprune) draws a flat heat map.
            scores = np.zeros(len(groups)) if result.scores is None else result.scores[b].float().cpu().numpy()
            units.append(Unit(caption, pixels.permute(1, 2, 0).byte().numpy(), groups, scores))
    return units


def render(units: list[Unit], cell: int | None = None) -> tuple[Image.Image, Layout]:
    """The picture of ``units`` (one row each: image, heat map) and its :class:`Layout`."""
    side = math.isqrt(len(units[0].groups))
    cell = cell or max(4, UNIT_PIXELS // side)
    layout = Layout(side, cell)
    size = layout.size
    width = max(2 * size + GAP, CHAR_PIXELS * max(len(unit.caption) for unit in units) + 4)  # captions fit
    canvas = Image.new("RGB", (width, layout.row_top(len(units)) - GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    palette = colormaps["tab20"]
    heat = colormaps["inferno"]
    for k, unit in enumerate(units):
        x0, y0 = layout.cell_origin(k, 0)
        draw.text((2, layout.row_top(k) + 2), unit.caption, fill=(0, 0, 0))
        picture = Image.fromarray(unit.pixels).resize((size, size), Image.Resampling.BICUBIC)
        overlay = np.asarray(picture, dtype=np.float32)
        for patch, group in enumerate(unit.groups):
            if group == DOMINANT:
                continue
            colour = DROPPED_SHADE if group == DROPPED else tuple(255 * c for c in palette(int(group) % 20)[:3])
            top, left = (patch // side) * cell, (patch % side) * cell
            block = overlay[top : top + cell, left : left + cell]
            block[:] = (1 - FILL_ALPHA) * block + FILL_ALPHA * np.array(colour, dtype=np.float32)
        canvas.paste(Image.fromarray(overlay.round().astype(np.uint8)), (x0, y0))
        span = float(unit.scores.max() - unit.scores.min()) or 1.0
        colours = heat((unit.scores - unit.scores.min()) / span)[:, :3].reshape(side, side, 3)
        heat_map = Image.fromarray((colours * 255).round().astype(np.uint8)).resize(
            (size, size), Image.Resampling.NEAREST
        )
        canvas.paste(heat_map, layout.cell_origin(k, 0, heat_map=True))
        for patch, group in enumerate(unit.groups):  # grid last: the borders are exactly ours, whatever the image
            x, y = layout.cell_origin(k, patch)
            box = (x, y, x + cell - 1, y + cell - 1)
            draw.rectangle(box, outline=OUTLINE if group == DOMINANT else GRID, width=2 if group == DOMINANT else 1)
    return canvas, layout


def outlined(image: Image.Image, layout: Layout, units: int) -> list[list[int]]:
    """Per unit, the raster indices of the patches whose border is drawn in :data:`OUTLINE` (read from pixels)."""
    pixels = np.asarray(image.convert("RGB"))
    found = []
    for k in range(units):
        cells = []
        for patch in range(layout.side**2):
            x, y = layout.cell_origin(k, patch)
            if tuple(pixels[y, x + layout.cell // 2]) == OUTLINE:  # the middle of the cell's top edge
                cells.append(patch)
        found.append(cells)
    return found
