"""Gallery PNG: every class average in a labelled grid (count and resolution)."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cryo2d.io.outputs import atomic_path


def _window(image: np.ndarray) -> tuple[float, float]:
    """The 0.5-99.5 percentile grey-level window of an image."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    return float(lo), float(hi)


def _tile(image: np.ndarray, size: int, window: tuple[float, float] | None = None) -> Image.Image:
    """One class average as an 8-bit tile in ``window`` (default: its own :func:`_window`), resized."""
    lo, hi = _window(image) if window is None else window
    scaled = np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1)
    # Row 0 at the top, as RELION's and CryoSPARC's displays show stacks.
    tile = Image.fromarray((scaled * 255).astype(np.uint8), mode="L")
    return tile.resize((size, size), Image.BICUBIC)


def render_gallery(
    classes: np.ndarray,
    counts: np.ndarray,
    resolution_angst: np.ndarray,
    path: str | os.PathLike,
    *,
    tile_px: int = 128,
    columns: int | None = None,
    empty_class: int = -1,
) -> None:
    """Write a PNG grid of class averages with "#k  n  res" under each.

    Parameters
    ----------
    classes : (K, box, box) float array
        Class averages (the order of classes.mrcs; class numbers are 1-based).
    counts : (K,) array
        Particles per class.
    resolution_angst : (K,) array
        Resolution per class, Å.
    path : str or PathLike
        PNG to write (atomically).
    tile_px : int
        Edge of each tile in the PNG, px.
    columns : int, optional
        Tiles per row (default: about square, at most K).
    empty_class : int
        The class of empty boxes (0-based), labelled "empty" instead of a resolution; -1 for none.
    """
    k = len(classes)
    # About square, but never wider than the classes: one class was drawn beside an empty column.
    cols = columns or max(1, min(k, math.ceil(math.sqrt(k * 1.3))))
    rows = max(1, math.ceil(k / cols))
    label_h = 16
    pad = 4
    W = cols * (tile_px + pad) + pad
    H = rows * (tile_px + label_h + pad) + pad
    canvas = Image.new("L", (W, H), color=0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    total = max(float(np.sum(counts)), 1.0)
    # The empty-box class gets the other classes' typical contrast around its
    # own median, so that it looks as flat as it is instead of stretched to full range.
    widths = [hi - lo for lo, hi in (_window(classes[i]) for i in range(k) if counts[i] > 0 and i != empty_class)]
    for i in range(k):
        r, c = divmod(i, cols)
        x = pad + c * (tile_px + pad)
        y = pad + r * (tile_px + label_h + pad)
        if counts[i] > 0:
            image = np.asarray(classes[i], dtype=np.float64)
            window = None
            if i == empty_class and widths:
                mid, half = float(np.median(image)), 0.5 * float(np.median(widths))
                window = (mid - half, mid + half)
            canvas.paste(_tile(image, tile_px, window), (x, y))
        res = resolution_angst[i]
        res_txt = f"{res:.0f}A" if np.isfinite(res) else "-"
        if i == empty_class:
            res_txt = "empty"
        text = f"#{i + 1} n={int(counts[i])} ({100 * counts[i] / total:.0f}%) {res_txt}"
        draw.text((x + 1, y + tile_px + 2), text, fill=255, font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
