"""Class moves of the online phase: merging redundant classes and seeding from misfits."""
from __future__ import annotations

import numpy as np
import torch

from cryo2d.em.engine import _MIN_SEED, Engine
from cryo2d.fourier import fft2c, rotate_images


def _blobs(box: int, centres: list[tuple[float, float]], width: float = 2.0) -> np.ndarray:
    y, x = np.mgrid[:box, :box] - box // 2
    return sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2)) for cx, cy in centres).astype(np.float32)


def _engine_with_classes(helpers, images: np.ndarray, counts: list[float]) -> Engine:
    """An engine whose classes are ``images`` (working box) with ``counts`` particles of CTF 1 and σ² = 1.

    Blob images at amplitude 0.15 make classes that a particle tells apart
    (distinct images lie far above the estimation noise of 50 particles).
    """
    box = images.shape[-1]
    particles = helpers.memory_particles(np.zeros((50, box, box)), pixel_size_angst=4.0)
    eng = Engine(particles, helpers.tiny_config(n_classes=len(images), use_ctf=False, max_res_angst=8.0))
    assert eng.geom.work_box == box
    s = eng.state
    s.A = fft2c(torch.from_numpy(images)).flatten(1)[:, eng.mpts.flat]
    s.counts = torch.tensor(counts, dtype=torch.float64)
    s.den = s.counts.float()[:, None].expand(-1, len(eng.mpts)).clone()
    s.num = s.A * s.den
    s.sigma2_shell = torch.ones(eng.n_shells)
    s.tau2 = torch.full((len(images), eng.n_shells), 1e3)
    s.r_res = float(eng.geom.r_align)
    return eng


def test_a_rotated_copy_is_redundant_and_the_smaller_is_freed(helpers):
    box = 32
    a = _blobs(box, [(-5, 0), (4, 3), (0, -6)])
    rotated = rotate_images(torch.from_numpy(a)[None], torch.tensor([48.0]))[0].numpy()  # on the 4° search grid
    other = _blobs(box, [(-6, -6), (6, 6)])
    ring = _blobs(box, [(7 * np.cos(t), 7 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 9)[:-1]])
    images = 0.15 * np.stack([a, rotated, other, ring])
    eng = _engine_with_classes(helpers, images, [60, 40, 50, 50])
    plan = eng.plan(eng.config.n_online_iterations - 1, online=True)
    assert len(plan.psi_rad) == 90
    assert eng._redundant_classes(plan) == [1]
    # Larger copy second: the freed one is still the smaller.
    eng = _engine_with_classes(helpers, images, [30, 70, 50, 50])
    assert eng._redundant_classes(plan) == [0]


def test_distinct_classes_are_not_redundant(helpers):
    box = 32
    images = 0.15 * np.stack([
        _blobs(box, [(-5, 0), (4, 3), (0, -6)]),
        _blobs(box, [(-6, -6), (6, 6)]),
        _blobs(box, [(0, 0)], width=4.0),
    ])
    eng = _engine_with_classes(helpers, images, [50, 50, 50])
    assert eng._redundant_classes(eng.plan(2, online=True)) == []


def test_misfit_groups_come_from_well_fitting_classes_only(helpers):
    box = 32
    images = np.stack([_blobs(box, [(0, 0)]), _blobs(box, [(5, 5)]), _blobs(box, [(-5, 5)])])
    eng = _engine_with_classes(helpers, images, [110, 110, 30])
    rng = np.random.default_rng(0)
    z = np.concatenate([
        rng.normal(1.0, 0.3, 100), np.full(10, -3.0),  # class 0: fits its members, 10 misfits
        rng.normal(-1.0, 0.5, 100), np.full(10, -5.0),  # class 1: junk-like (median z < 0)
        rng.normal(1.0, 0.3, 30),  # class 2: no misfits
    ])
    k = np.repeat([0, 0, 1, 1, 2], [100, 10, 100, 10, 30])
    norm = np.full(len(z), 100.0)
    per = {"k": k, "cross": norm + np.sqrt(norm) * z, "norm": norm}
    groups = eng._misfit_groups(per["k"], eng._fit_z(per), exclude=set())
    assert len(groups) == 1
    assert groups[0].tolist() == list(range(100, 110))
    assert len(groups[0]) >= _MIN_SEED
    assert eng._misfit_groups(per["k"], eng._fit_z(per), exclude={0}) == []
