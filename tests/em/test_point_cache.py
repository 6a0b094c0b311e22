"""The run's cache of particle transforms at the M-step points."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cryo2d.em.data import PointCache, load_batch
from cryo2d.em.geometry import disc_points, make_geometry


def _setup(helpers, n=12, box=24, seed=0):
    rng = np.random.default_rng(seed)
    particles = helpers.memory_particles(rng.standard_normal((n, box, box)), pixel_size_angst=4.0)
    geom = make_geometry(box, 4.0, helpers.tiny_config())
    flat = disc_points(geom.work_box, 0.0, geom.r_max, half=True).flat
    return particles, geom, flat


def _direct(particles, geom, flat, idx):
    return load_batch(particles, np.asarray(idx), geom, "cpu").flatten(1)[:, flat]


def test_reads_equal_a_fresh_read_bit_for_bit(helpers):
    """Hits, misses, mixes and repeats give exactly what load_batch gives; only ``capacity`` particles are kept."""
    particles, geom, flat = _setup(helpers)
    per_particle = 8 * len(flat)
    cache = PointCache(particles, geom, flat, "cpu", budget_bytes=5 * per_particle)
    assert cache.capacity == 5
    for idx in ([3, 7, 1], [1, 3, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7, 2], [11, 3]):
        got = cache.read_with_ctf(np.array(idx))[0]
        assert got.dtype == torch.complex64 and got.shape == (len(idx), len(flat))
        assert torch.equal(got, _direct(particles, geom, flat, idx)), idx
    assert cache.used == 5
    kept = np.nonzero(cache.slot >= 0)[0]
    assert len(kept) == 5 and set(kept) == {1, 3, 7, 9, 10}  # the first five distinct particles read
    assert sorted(cache.slot[kept]) == list(range(5))


def test_no_budget_keeps_nothing(helpers):
    particles, geom, flat = _setup(helpers)
    cache = PointCache(particles, geom, flat, "cpu", budget_bytes=0)
    assert cache.capacity == 0
    assert torch.equal(cache.read_with_ctf(np.array([2, 5]))[0], _direct(particles, geom, flat, [2, 5]))
    assert cache.values is None and (cache.slot < 0).all()


def test_a_run_gives_the_same_classes_without_the_cache(helpers, monkeypatch):
    """The cache only saves work: a run with it is bit-identical to a run reading every image
    (and computing every CTF) each time."""
    from cryo2d.em.engine import run_em

    particles, _, _ = _setup(helpers, n=60, box=24, seed=1)
    defocus = np.linspace(10000.0, 25000.0, 60)
    particles = dataclasses.replace(
        particles, ctf=dataclasses.replace(helpers.constant_ctf(60), defocus_u_angst=defocus, defocus_v_angst=defocus)
    )
    config = helpers.tiny_config()
    original = PointCache.__init__
    capacities = []

    def init(self, *args, budget_bytes=None, **kwargs):
        original(self, *args, **kwargs, **({} if budget_bytes is None else {"budget_bytes": budget_bytes}))
        capacities.append(self.capacity)

    monkeypatch.setattr(PointCache, "__init__", init)
    with_cache = run_em(particles, config)
    monkeypatch.setattr(PointCache, "__init__", lambda self, *args, **kwargs: init(self, *args, **kwargs, budget_bytes=0))
    without = run_em(particles, config)
    assert capacities == [60, 0]
    assert np.array_equal(with_cache.class_index, without.class_index)
    assert np.array_equal(with_cache.psi_deg, without.psi_deg)
    assert np.array_equal(with_cache.classes, without.classes)


def test_kept_ctfs_equal_a_fresh_computation(helpers):
    """With CTFs, hits and misses give exactly batch_ctf's values at the points; a particle takes
    12 bytes a point, so the same budget keeps fewer of them."""
    from cryo2d.em.data import batch_ctf

    _, geom, flat = _setup(helpers)
    rng = np.random.default_rng(3)
    defocus = np.linspace(8000.0, 30000.0, 12)  # a CTF of its own for each particle
    ctf = dataclasses.replace(helpers.constant_ctf(12), defocus_u_angst=defocus, defocus_v_angst=defocus * 1.05)
    particles = helpers.memory_particles(rng.standard_normal((12, 24, 24)), pixel_size_angst=4.0, ctf=ctf)
    cache = PointCache(particles, geom, flat, "cpu", budget_bytes=60 * len(flat), use_ctf=True)
    assert cache.capacity == 5
    for idx in ([3, 7, 1], [1, 3, 9, 10, 11], [7, 7, 2]):
        X, C = cache.read_with_ctf(np.array(idx))
        assert torch.equal(X, _direct(particles, geom, flat, idx))
        assert torch.equal(C, batch_ctf(particles, np.array(idx), geom, True, "cpu", flat=flat))
        assert float(C.std()) > 0.1  # a real CTF, not ones
    without = PointCache(particles, geom, flat, "cpu", budget_bytes=60 * len(flat))
    assert without.capacity == 7
    assert torch.equal(without.read_with_ctf(np.array([2, 5]))[1], torch.ones(2, len(flat)))


def test_optics_groups_of_slightly_different_pixel_sizes(helpers):
    """Pixel sizes up to 2 % apart: one run at their median, each particle's CTF at its own frequencies."""
    import pytest

    from cryo2d.ctf import ctf_2d
    from cryo2d.em.data import batch_ctf
    from cryo2d.em.engine import Engine
    from cryo2d.errors import Cryo2DError
    from cryo2d.fourier import freq_grid

    rng = np.random.default_rng(5)
    pixel = np.where(np.arange(12) % 2, 4.06, 4.0)  # two optics groups, 1.5 % apart
    defocus = np.linspace(8000.0, 30000.0, 12)
    ctf = dataclasses.replace(helpers.constant_ctf(12), defocus_u_angst=defocus, defocus_v_angst=defocus)
    particles = dataclasses.replace(helpers.memory_particles(rng.standard_normal((12, 24, 24)), ctf=ctf),
                                    pixel_size_angst=pixel)
    engine = Engine(particles, helpers.tiny_config())
    geom = engine.geom
    assert geom.pixel_size_angst == pytest.approx(4.03)
    C = batch_ctf(particles, np.arange(12), geom, True, "cpu")
    for i in (0, 1):  # on the working grid, index k is frequency k / (box · the particle's own pixel size)
        own = freq_grid(geom.work_box, pixel[i] * geom.box / geom.work_box)
        torch.testing.assert_close(C[i], ctf_2d(own, ctf.subset(np.array([i])))[0], atol=2e-5, rtol=0)
    far = dataclasses.replace(particles, pixel_size_angst=np.where(np.arange(12) % 2, 4.2, 4.0))
    with pytest.raises(Cryo2DError, match=r"pixel sizes 4.0000-4.2000 Å, more than 2 % apart"):
        Engine(far, helpers.tiny_config())


def test_particles_read_elsewhere_are_kept_once_and_read_back(helpers):
    """``keep`` stores values read outside the cache (the starting classes' particles) up to its
    capacity, skipping repeats and particles it holds; later reads give them back unchanged."""
    particles, geom, flat = _setup(helpers)
    cache = PointCache(particles, geom, flat, "cpu", budget_bytes=5 * 8 * len(flat))
    cache.read_with_ctf(np.array([4]))  # one particle kept by a read
    idx = np.array([6, 4, 6, 2, 0, 8, 11])
    values = _direct(particles, geom, flat, idx)
    cache.keep(idx, values, torch.ones(len(idx), len(flat)))
    kept = np.nonzero(cache.slot >= 0)[0]
    assert cache.used == 5 and set(kept) == {4, 6, 2, 0, 8}  # 4 already held, 6 once, 11 over capacity
    assert sorted(cache.slot[kept]) == list(range(5))
    assert torch.equal(cache.values[cache.slot[[6, 2, 0, 8]]], values[[0, 3, 4, 5]])
    assert torch.equal(cache.read_with_ctf(np.array([8, 4, 11]))[0], _direct(particles, geom, flat, [8, 4, 11]))
    cache.keep(np.array([1]), _direct(particles, geom, flat, [1]), torch.ones(1, len(flat)))  # full: nothing kept
    assert cache.used == 5 and cache.slot[1] == -1
