"""Gallery PNG: tiles, labels and the empty-box class's contrast."""
from __future__ import annotations

import numpy as np
from PIL import Image

from cryo2d.gallery.render import render_gallery

TILE, PAD = 64, 4


def _tiles(path, k):
    with Image.open(path) as img:
        a = np.asarray(img, dtype=np.float64)
    return [a[PAD : PAD + TILE, PAD + i * (TILE + PAD) : PAD + i * (TILE + PAD) + TILE] for i in range(k)]


def test_empty_class_is_drawn_with_the_other_classes_contrast(tmp_path):
    """A faint empty-box average stays faint; as an ordinary class it would be stretched to full range."""
    y, x = np.indices((32, 32)) - 16
    blob = np.exp(-(x**2 + y**2) / 40.0)
    faint = 0.01 * np.random.default_rng(0).standard_normal((32, 32))
    classes = np.stack([blob, faint]).astype(np.float32)
    counts, res = np.array([100, 20]), np.array([20.0, 40.0])
    render_gallery(classes, counts, res, tmp_path / "empty.png", tile_px=TILE, columns=2, empty_class=1)
    render_gallery(classes, counts, res, tmp_path / "plain.png", tile_px=TILE, columns=2)
    particle, empty = _tiles(tmp_path / "empty.png", 2)
    _, stretched = _tiles(tmp_path / "plain.png", 2)
    assert particle.std() > 50 and stretched.std() > 30  # full-range windows
    assert empty.std() < 0.05 * particle.std()  # same window width as the particle: 1 % of its range
    assert abs(empty.mean() - 127.5) < 5  # centred on its own median: mid grey


def test_a_single_class_fills_the_gallery_alone(tmp_path):
    """K = 1: one tile wide (the default layout drew it beside an empty column, half the PNG blank)."""
    y, x = np.indices((32, 32)) - 16
    blob = np.exp(-(x**2 + y**2) / 40.0)[None].astype(np.float32)
    render_gallery(blob, np.array([400]), np.array([15.2]), tmp_path / "one.png", tile_px=TILE)
    with Image.open(tmp_path / "one.png") as img:
        assert img.size == (TILE + 2 * PAD, TILE + 16 + 2 * PAD)
    assert _tiles(tmp_path / "one.png", 1)[0].max() == 255
    for k, cols in ((2, 2), (3, 2), (7, 4)):  # the about-square layout of more classes is unchanged
        render_gallery(np.repeat(blob, k, 0), np.full(k, 10), np.full(k, 20.0), tmp_path / f"{k}.png", tile_px=TILE)
        with Image.open(tmp_path / f"{k}.png") as img:
            assert img.size[0] == cols * (TILE + PAD) + PAD
