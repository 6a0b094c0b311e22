"""Class moves of the online phase: merging redundant classes and seeding from misfits."""
from __future__ import annotations

import numpy as np
import torch

from cryo2d.em.engine import Engine
from cryo2d.em.moves import _MIN_SEED
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
    s.r_res = s.r_res_sums = float(eng.geom.r_align)
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



_A = _blobs(32, [(-5, 0), (4, 3), (0, -6)])
_NEW = _blobs(32, [(0, 0)], width=4.0)
_OTHER = _blobs(32, [(-6, -6), (6, 6)])


def _noisy_engine(helpers, n_a: int, n_new: int, n_other: int, seed: int):
    """Engine (K = 3, no CTF) on noisy copies of _A, _NEW, _OTHER, in that order; returns (engine, idx, per)."""
    rng = np.random.default_rng(seed)
    clean = np.concatenate([np.repeat(_A[None], n_a, 0), np.repeat(_NEW[None], n_new, 0), np.repeat(_OTHER[None], n_other, 0)])
    images = 2.0 * clean + rng.normal(0.0, 1.0, clean.shape)
    eng = Engine(helpers.memory_particles(images, pixel_size_angst=4.0),
                 helpers.tiny_config(n_classes=3, use_ctf=False, max_res_angst=8.0))
    eng.initialise()
    idx = np.arange(len(images))
    per = {"shift": np.zeros((len(idx), 2), dtype=np.float32), "psi": np.zeros(len(idx), dtype=np.float32)}
    return eng, idx, per


def _set_classes(eng, idx, per, rows0, rows1) -> None:
    """Classes 0 and 1 := averages of ``rows0`` and ``rows1``; class 2 empty."""
    for k, rows in ((0, rows0), (1, rows1)):
        eng._seed_class(k, idx, per, rows)
        eng._solve_one(k)
    s = eng.state
    s.num[2], s.den[2], s.counts[2] = 0, 0, 0


def _is_new_view(eng, k: int) -> bool:
    img = eng._to_real(eng.state.A[k : k + 1])[0].numpy()
    corr = lambda x, y: float(np.corrcoef(x.ravel(), y.ravel())[0, 1])  # noqa: E731
    return corr(img, _NEW) > 0.9 and corr(img, _NEW) > corr(img, _A) + 0.3


def test_a_seed_that_repeats_a_class_is_refused_and_a_new_view_is_placed(helpers):
    """``_place_seed`` skips a group whose average duplicates class 0 and seeds from the next one."""
    eng, idx, per = _noisy_engine(helpers, 40, 20, 20, seed=1)
    _set_classes(eng, idx, per, np.arange(0, 20), np.arange(60, 80))
    s = eng.state
    plan = eng.plan(eng.config.n_online_iterations - 1, online=True)
    tail_of_a, view_new = np.arange(20, 40), np.arange(40, 60)

    assert not eng._place_seed(2, idx, per, [tail_of_a], plan)
    assert float(s.counts[2]) == 0.0 and float(s.den[2].abs().sum()) == 0.0  # restored

    seeds = [tail_of_a, view_new]
    assert eng._place_seed(2, idx, per, seeds, plan)
    assert seeds == [] and float(s.counts[2]) == 20.0
    assert _is_new_view(eng, 2)


def test_a_class_grows_from_the_misfits_no_class_models(helpers):
    """``_grow_seeds``: particles of an unmodelled view, hidden among class 0's members, form a new class."""
    eng, idx, per = _noisy_engine(helpers, 60, 20, 40, seed=2)
    rng = np.random.default_rng(3)
    z = np.concatenate([rng.normal(1.0, 0.5, 60), np.full(20, -3.0), rng.normal(1.0, 0.5, 40)])
    norm = np.full(len(z), 100.0)
    per.update(k=np.repeat([0, 0, 1], [60, 20, 40]), cross=norm + np.sqrt(norm) * z, norm=norm)
    _set_classes(eng, idx, per, np.arange(0, 60), np.arange(80, 120))
    before = [eng._class_copy(k) for k in (0, 1)]
    plan = eng.plan(eng.config.n_online_iterations - 1, online=True)

    assert eng._grow_seeds([2], idx, per, eng._fit_z(per), plan) == {2}
    assert 15 <= float(eng.state.counts[2]) <= 25
    assert _is_new_view(eng, 2)
    for k, saved in zip((0, 1), before):  # the other classes are left as they were
        assert all(torch.equal(x, y) for x, y in zip(eng._class_copy(k), saved))


def test_growing_backs_off_after_attempts_that_place_nothing(helpers, monkeypatch):
    """``_reseed_empty`` tries to grow classes every iteration until two attempts in a row place
    nothing, then waits 1, then 2 iterations between attempts; a placed class resets the wait."""
    eng, idx, per = _noisy_engine(helpers, 40, 20, 20, seed=4)
    per.update(k=np.repeat([0, 1, 1], [40, 20, 20]), cross=np.full(80, 110.0), norm=np.full(80, 100.0))
    plan = eng.plan(eng.config.n_online_iterations - 1, online=True)
    outcomes = iter([set()] * 5 + [{2}] + [set()] * 3)
    tried = []

    def fake_grow(targets, idx_, per_, z, plan_):
        tried.append(True)
        return next(outcomes)

    monkeypatch.setattr(eng, "_grow_seeds", fake_grow)
    monkeypatch.setattr(eng, "_place_seed", lambda *a: False)
    monkeypatch.setattr(eng, "_seed_class", lambda *a: None)
    attempts = []
    for _ in range(16):
        eng.state.counts[2] = 0.0  # class 2 stays empty: a target every iteration
        n = len(tried)
        eng._reseed_empty(idx, per, plan)
        attempts.append(len(tried) - n)
    # fail, fail, wait 1, fail, wait 2, fail, wait 2, fail, wait 2, placed, fail, fail, wait 1
    assert attempts == [1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0]
    assert eng.state.grow_failures == 2 and eng.state.grow_wait == 0
