"""The engine end to end: label recovery on easy data, and the issue's quality bar."""
from __future__ import annotations

import numpy as np
import pytest

from cryo2d.em.config import EMConfig
from cryo2d.em.engine import run_em
from cryo2d.em.rotation import rotate_classes
from cryo2d.evaluate import purity


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie's adjusted Rand index of two labelings (1 = identical up to permutation)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index = comb(table).sum()
    rows, cols = comb(table.sum(axis=1)).sum(), comb(table.sum(axis=0)).sum()
    expected = rows * cols / comb(len(a))
    return float((index - expected) / (0.5 * (rows + cols) - expected))


def test_adjusted_rand_index():
    assert adjusted_rand_index(np.array([0, 0, 1, 1, 2, 2]), np.array([5, 5, 3, 3, 4, 4])) == pytest.approx(1.0)
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) < 0


def test_recovers_three_views(sim3, particles3):
    """STYLE: simulate(k=3, box=32, n=300, snr=10, seed=0) -> labels recovered up to permutation."""
    config = EMConfig(n_classes=3, n_online_iterations=6, batch_size_per_class=30, seed=0)
    result = run_em(particles3, config)
    views = sim3.truth["view"].to_numpy()
    assert (result.class_index >= 0).all()
    assert adjusted_rand_index(views, result.class_index) >= 0.95
    assert purity(views, result.class_index) >= 0.95
    # Within a class, the found angles differ from the true ones by one constant (the class's own frame).
    for k in np.unique(result.class_index):
        sel = result.class_index == k
        d = np.deg2rad(sim3.truth["psi_deg"].to_numpy()[sel] - result.psi_deg[sel])
        spread = np.degrees(np.sqrt(-2 * np.log(np.abs(np.mean(np.exp(1j * d))))))
        assert spread < 10.0, (k, spread)


@pytest.mark.slow
def test_quality_small(bundled_volume, tmp_path):
    """Quality on the engine issue's small set: 1,500 particles, 48 px, SNR 0.1, 10 % junk, 8 views (one at 3 %), K=12.

    The issue's bar (junk F1 ≥ 0.9, purity ≥ 0.8, rare view in a class of
    its own, median NCC ≥ 0.8) is not fully met yet; this guards what the
    engine reaches today with defaults (session 11, simulation seeds 0-5, one
    thread: junk F1 0.751-0.863, purity 0.845-0.934, rare view kept on 5 of
    the 6 seeds, median NCC 0.986-0.989, no empty class; the empty boxes
    gather in the empty-box class, the doublets are what keeps junk F1 below
    0.9: their best-pose residual is only about one SD above that of the
    particles of their class, session 12; a doublet class made from all 50
    at their true centres and pair axes kept 1 of them in the last pass,
    session 49; from the split start, the default since session 56, with the
    empty-box class from a quarter of the online iterations (session 57), EM
    seeds 0-9 on simulation seed 0: junk F1 0.742-0.870, purity 0.874-0.950,
    rare view kept on 8 of the 10, median NCC 0.994-0.996), with
    a margin for the chaotic EM trajectory, and above RELION 3.1 Class2D on
    the same kind of data (benchmarks/README.md: junk F1 0.03, purity 0.59,
    6 empty classes).
    """
    from cryo2d.classify import classify
    from cryo2d.evaluate import score_job
    from cryo2d.simulate import simulate, write_simulation

    sim = simulate(*bundled_volume, n_particles=1500, box=48, snr=0.1, junk_fraction=0.1,
                   views="discrete", n_views=8, rare_view_fraction=0.03, seed=0)
    data = write_simulation(sim, tmp_path / "data")
    classify(data / "particles.star", tmp_path / "job", EMConfig(n_classes=12, seed=0))
    scores = score_job(tmp_path / "job", data)
    summary = {k: scores[k] for k in ("junk_f1", "purity", "rare_view_recovered", "median_ncc", "n_empty_classes")}
    assert scores["junk_f1"] >= 0.65, summary
    assert scores["purity"] >= 0.8, summary  # the bar
    assert scores["median_ncc"] >= 0.9, summary
    assert scores["n_empty_classes"] <= 1, summary


def test_online_m_step_sums_stop_at_the_plans_radius(particles3):
    """An online pass sums the M-step only within r_mstep: zero beyond, close to a full-radius pass inside.

    The back-rotation interpolates on a zero-padded (sinc-interpolated)
    grid, so cutting the sums at r_mstep changes the interpolated values
    inside a little (64 px, K = 20: 1 % within the E-step radius, 13 % at
    the edge). Checked within the E-step radius, where the next E-step
    reads the classes; the noise counts stop at the same shells.
    """
    import dataclasses
    import math

    import torch

    from cryo2d.em.engine import Engine

    eng = Engine(particles3, EMConfig(n_classes=3, seed=0))
    eng.initialise()
    eng.iterate(0)
    eng.state.r_res = eng.state.r_res_sums = 3.0  # E-step radius 6, M-step sums to 13 of 15 Fourier px
    plan = eng.plan(1, online=True)
    assert plan.r_mstep < eng.geom.r_max and math.isinf(eng.plan(1, online=False).r_mstep)
    idx = np.arange(60)
    (num, den, counts, nsum, ncnt), _ = eng.pass_over(idx, plan, "soft", 1)
    (num_f, den_f, counts_f, _, ncnt_f), _ = eng.pass_over(idx, dataclasses.replace(plan, r_mstep=math.inf), "soft", 1)
    radius = eng.mpts.xy.norm(dim=1)
    beyond, inside = radius > plan.r_mstep, radius <= plan.r_cur
    assert float(num[:, beyond].abs().max()) == 0.0 and float(den[:, beyond].abs().max()) == 0.0
    assert float((num[:, inside] - num_f[:, inside]).norm() / num_f[:, inside].norm()) < 0.03
    near = radius <= plan.r_mstep - 1.5  # CTF² sums: bilinear, no padding, so equal beyond its reach of the edge
    torch.testing.assert_close(den[:, near], den_f[:, near])
    torch.testing.assert_close(counts, counts_f)
    shells = torch.arange(len(ncnt), dtype=torch.float32)
    assert float(ncnt[shells > plan.r_mstep + 0.5].sum()) == 0.0 and float(ncnt_f[shells > plan.r_mstep + 0.5].sum()) > 0


def test_online_resolution_counts_each_particle_once(bundled_volume, helpers):
    """Batches of the whole data set: the online resolution is the full pass's, not that of the repeated sums.

    600 particles, 48 px, SNR 0.2, 3 views, K = 3, 20 online iterations of
    600: the running sums count each particle about 4 times by the end, and
    their SSNR reaches Nyquist (shell 23) while one full pass over the same
    particles measures shell 16. The resolution the engine reports must be
    the full pass's, and the E-step radius at most 6 shells beyond it.
    """
    from cryo2d.em.engine import Engine
    from cryo2d.simulate import simulate

    n = 600
    sim = simulate(*bundled_volume, n_particles=n, box=48, snr=0.2, junk_fraction=0.0,
                   views="discrete", n_views=3, rare_view_fraction=1 / 3, seed=0)
    particles = helpers.memory_particles(sim.images, sim.pixel_size_angst, ctf=sim.ctf)
    config = EMConfig(n_classes=3, n_online_iterations=20, batch_size_per_class=n // 3, n_full_iterations=1,
                      seed=0, empty_class=False)
    eng = Engine(particles, config)
    eng.initialise()
    for it in range(config.n_online_iterations):
        eng.iterate(it)
    s = eng.state
    online_res, online_sums = s.r_res, s.r_res_sums
    assert float(s.counts.sum()) > 3.5 * n
    r_cur = eng.plan(config.n_online_iterations, online=False).r_cur
    eng.iterate(config.n_online_iterations)  # the full pass: each particle once
    assert float(s.counts.sum()) == pytest.approx(n)
    assert s.r_res == s.r_res_sums
    assert abs(online_res - s.r_res) <= 1.0, (online_res, s.r_res)
    assert online_sums >= s.r_res + 5.0, (online_sums, s.r_res)
    assert r_cur <= online_res + 6.0


def test_starting_classes_do_not_depend_on_the_read_size(particles3, monkeypatch):
    """The starting classes and noise model are sums over the chosen images: reading them 64 at a time
    (as a large box would) gives what one read of all 300 gives, up to float32 rounding."""
    import torch

    import cryo2d.em.engine as engine_mod
    from cryo2d.em.engine import Engine

    def start(read: int):
        monkeypatch.setattr(engine_mod, "_INIT_READ", read)
        eng = Engine(particles3, EMConfig(n_classes=3, seed=4))
        eng.initialise()
        return eng.state

    one, grouped = start(10_000), start(64)
    torch.testing.assert_close(grouped.sigma2_shell, one.sigma2_shell, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grouped.counts, one.counts)
    torch.testing.assert_close(grouped.num, one.num, rtol=1e-4, atol=1e-4 * float(one.num.abs().max()))
    torch.testing.assert_close(grouped.A, one.A, rtol=1e-4, atol=1e-4 * float(one.A.abs().max()))
    assert float(one.counts.sum()) == 300.0


def test_aligned_sums_do_not_depend_on_the_read_size(particles3, monkeypatch):
    """A re-seeded class's sums (images de-shifted and rotated into one class) are the same read
    64 at a time as in one read of 200, up to float32 rounding."""
    import torch

    import cryo2d.em.engine as engine_mod
    from cryo2d.em.engine import Engine

    eng = Engine(particles3, EMConfig(n_classes=3, seed=0))
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(len(particles3), size=200, replace=False))
    labels = torch.zeros(200, dtype=torch.long)
    psi = torch.from_numpy(rng.uniform(0, 2 * np.pi, size=200)).float()
    shifts = torch.from_numpy(rng.uniform(-2, 2, size=(200, 2))).float()

    def sums(read: int):
        monkeypatch.setattr(engine_mod, "_INIT_READ", read)
        (num, den, counts), sig = eng._read_fixed(idx, labels, psi, n_classes=1, shifts_px=shifts)
        assert sig is None
        return num, den, counts

    (num1, den1, c1), (num2, den2, c2) = sums(10_000), sums(64)
    assert float(c1.sum()) == float(c2.sum()) == 200.0
    torch.testing.assert_close(num2, num1, rtol=1e-4, atol=1e-4 * float(num1.abs().max()))
    torch.testing.assert_close(den2, den1, rtol=1e-4, atol=1e-4 * float(den1.abs().max()))
    unshifted, _ = eng._read_fixed(idx, labels, psi, n_classes=1)
    assert float((unshifted[0] - num1).abs().max()) > 0.1 * float(num1.abs().max())  # the shifts are applied


def test_references_over_budget_are_sampled_with_the_same_result(particles3, helpers, monkeypatch):
    """Past REFS_BUDGET_BYTES the passes sample their references from a RotationTable: same labels,
    angles and classes as with the dense references (float rounding only), on the exhaustive and the
    coarse-to-fine search."""
    import cryo2d.em.engine as engine_mod
    from cryo2d.em.rotation import RotationTable

    made = []
    original = RotationTable.__init__

    def counting(self, *args):
        original(self, *args)
        made.append(self.n_dense)

    monkeypatch.setattr(RotationTable, "__init__", counting)
    default = engine_mod.REFS_BUDGET_BYTES
    for exhaustive in (False, True):
        config = helpers.tiny_config(coarse_to_fine=not exhaustive)
        dense = run_em(particles3, config)
        assert not made and all(h["sampled_reference_classes"] == 0 for h in dense.history)
        # 0: every row sampled; 600 kB: one or two of the 3 classes made once (255 kB each here), the rest sampled
        for budget, n_dense in ((0, {0}), (600_000, {1, 2})):
            monkeypatch.setattr(engine_mod, "REFS_BUDGET_BYTES", budget)
            lazy = run_em(particles3, config)
            assert len(made) == config.n_online_iterations + config.n_full_iterations and set(made) <= n_dense, made
            assert [h["sampled_reference_classes"] for h in lazy.history] == [3 - d for d in made]
            made.clear()
            assert np.array_equal(lazy.class_index, dense.class_index)
            d = np.angle(np.exp(1j * np.deg2rad(lazy.psi_deg - dense.psi_deg)))
            assert np.abs(d).max() < 1e-3
            np.testing.assert_allclose(lazy.classes, dense.classes, rtol=0, atol=1e-3 * np.abs(dense.classes).max())
        monkeypatch.setattr(engine_mod, "REFS_BUDGET_BYTES", default)


@pytest.mark.parametrize("soft,start", [(False, "random"), (True, "random"), (False, "split"), (True, "split")])
def test_the_torch_path_of_a_gpu_classifies_as_the_cpu_kernels_do(bundled_volume, helpers, monkeypatch, soft, start):
    """A whole job with every step in torch (what ``--device cuda`` runs; here on the CPU, with
    ``kernels.available`` false) against the same job with the Numba kernels: the same labels, angles,
    shifts and empty-box class, the classes to float rounding (with ``soft``, nearly the same: see
    below). 600 particles of 4 views with 20 % junk, K = 6, 8 online iterations: the coarse-to-fine
    search, re-seeded (from the random start) and grown classes, the empty-box class and (``soft``)
    fractional posteriors all run, after the split start's stages or the random start.

    The coarse stage runs in float32 on every host (the kernels' product on half-turn pairs, torch's
    product of before): in bfloat16 (AMX hosts) the classes' last-bit differences between the two
    paths round some coarse references to the next bfloat16, and the jobs part after a few iterations;
    int8 (AVX2 hosts) has no torch path."""
    import torch

    import cryo2d.em.engine as engine_mod
    from cryo2d.em import kernels
    from cryo2d.simulate import simulate

    if not kernels.available("cpu"):
        pytest.skip("Numba not installed")
    monkeypatch.setattr(engine_mod, "coarse_dtype_for", lambda device: torch.float32)
    sim = simulate(*bundled_volume, n_particles=600, box=32, snr=0.5, junk_fraction=0.2, views="discrete", n_views=4,
                   rare_view_fraction=0.1, seed=1)
    particles = helpers.memory_particles(sim.images, sim.pixel_size_angst, ctf=sim.ctf)
    config = EMConfig(n_classes=6, n_online_iterations=8, batch_size_per_class=40, n_full_iterations=1, seed=0,
                      force_max=not soft, start=start)
    compiled = run_em(particles, config)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    plain = run_em(particles, config)
    assert compiled.empty_class >= 0
    assert start == "split" or sum(h["reseeded"] for h in compiled.history) >= 2
    assert plain.empty_class == compiled.empty_class
    d = np.angle(np.exp(1j * np.deg2rad(plain.psi_deg - compiled.psi_deg)))
    if not soft:
        assert np.array_equal(plain.class_index, compiled.class_index)
        assert np.abs(d).max() < 1e-3
        np.testing.assert_array_equal(plain.shift_px, compiled.shift_px)
        np.testing.assert_allclose(plain.classes, compiled.classes, rtol=0, atol=1e-4 * np.abs(compiled.classes).max())
        return
    assert float(compiled.class_posterior.min()) < 0.99  # some particles' weight is spread
    # Soft passes sum only the poses above a weight cutoff, and a weight at the cutoff falls on
    # either side of it in the two paths' last bits: on an AMD EPYC host (AVX-512) the random
    # start's sums part by 2e-4 at the second iteration, and the job ends with 3 of 600 labels,
    # 7 % of the poses and one class at correlation 0.992 apart (session 57).
    same = plain.class_index == compiled.class_index
    assert same.mean() >= 0.98
    same_pose = same & (np.abs(d) < 1e-3) & (plain.shift_px == compiled.shift_px).all(axis=1)
    assert same_pose.mean() >= 0.85
    for a, b in zip(plain.classes.astype(np.float64), compiled.classes.astype(np.float64)):
        if np.abs(b).max() > 0:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.98


def test_refs_budget_is_larger_on_a_gpu(monkeypatch):
    """CPU: REFS_BUDGET_BYTES; CUDA: a quarter of the device's memory when that is more."""
    import types

    import torch

    import cryo2d.em.engine as engine_mod

    assert engine_mod.refs_budget("cpu") == engine_mod.REFS_BUDGET_BYTES
    for total, budget in ((80 << 30, 20 << 30), (2 << 30, engine_mod.REFS_BUDGET_BYTES)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, t=total: types.SimpleNamespace(total_memory=t))
        assert engine_mod.refs_budget("cuda:0") == budget


def test_chunk_budget_scales_with_gpu_memory(monkeypatch):
    """CPU: 512 MB and 512 particles a chunk; CUDA: a 16th of the device's memory, at most 4 GB,
    and up to 4,096 particles."""
    import types

    import torch

    import cryo2d.em.engine as engine_mod

    assert engine_mod.chunk_budget("cpu") == (512e6, 512)
    for total, budget in ((141 << 30, 4e9), (16 << 30, 1 << 30), (8 << 30, 512 << 20)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, t=total: types.SimpleNamespace(total_memory=t))
        assert engine_mod.chunk_budget("cuda:0") == (budget, 4096)


def test_growing_a_class_against_the_own_pose_matches_the_full_search(particles3, monkeypatch):
    """Hard mode: searching only the class being grown, against each particle's best pose of the
    last pass rescored (Engine._own_pose_logp), sends nearly the same particles to it as searching
    every class (the other classes have not changed since that pass). Not exactly: the
    coarse-to-fine search misses a particle's best pose now and then (here by up to 60 nats for
    3 % of them), and which it misses depends on the classes searched. The full search is run
    without skipping far candidates (PRUNE_NATS): at this SNR (10) the skip moves 2 of its 61.
    Here 63 and 69 particles join it (session 30; over EM seeds 0-5 the two searches differ by
    2-11 particles of 35-89, and their sums by 7-21 %)."""
    import torch

    import cryo2d.em.engine as engine_module
    from cryo2d.em.engine import Engine

    monkeypatch.setattr(engine_module, "PRUNE_NATS", float("inf"))

    eng = Engine(particles3, EMConfig(n_classes=3, seed=0))
    eng.initialise()
    for it in range(3):
        eng.iterate(it)
    plan = eng.plan(3, online=True)
    idx = np.arange(len(particles3))
    _, per = eng.pass_over(idx, plan, "hard", 3)
    # Class 1 re-seeded from half of class 0's members, as growing starts: a rival of class 0.
    eng._seed_class(1, idx, per, np.nonzero(per["k"] == 0)[0][::2])
    eng._solve_one(1)
    pool = np.nonzero(per["k"] != 1)[0]
    tk = torch.tensor([1])
    rival = eng._own_pose_logp(idx[pool], per, pool, plan)
    (num_a, den_a, cnt_a, _, _), _ = eng.pass_over(idx[pool], plan, "hard", 0, classes=tk)
    (num_b, den_b, cnt_b, _, _), _ = eng.pass_over(idx[pool], plan, "hard", 0, classes=tk, rival=rival)
    assert 40 <= float(cnt_a[1]) <= 80  # a real split of class 0's 100 members
    assert abs(float(cnt_b[1]) - float(cnt_a[1])) <= 0.15 * float(cnt_a[1])
    assert float(cnt_b[0]) == float(cnt_b[2]) == 0.0  # only the grown class is summed
    assert float((num_b[1] - num_a[1]).abs().norm() / num_a[1].abs().norm()) < 0.15
    assert float((den_b[1] - den_a[1]).norm() / den_a[1].norm()) < 0.15


def test_seeding_classes_together_gives_each_its_own_sums_and_a_pass_without_noise_the_same_sums(particles3):
    """Engine._seed_classes (a growing pass's targets read together) gives each class the sums
    Engine._seed_class gives it alone (to float rounding: the de-shift phases of another batch),
    also a class read in two parts; a pass with noise=False (the growing passes) sums the
    same classes bit for bit, with its residuals and noise sums zero."""
    import torch

    from cryo2d.em.engine import Engine

    eng = Engine(particles3, EMConfig(n_classes=3, seed=0))
    eng.initialise()
    eng.iterate(0)
    plan = eng.plan(1, online=True)
    idx = np.arange(len(particles3))
    (num, den, counts, nsum, _), per = eng.pass_over(idx, plan, "hard", 1)
    (num_q, den_q, counts_q, nsum_q, ncnt_q), per_q = eng.pass_over(idx, plan, "hard", 1, noise=False)
    assert torch.equal(num, num_q) and torch.equal(den, den_q) and torch.equal(counts, counts_q)
    np.testing.assert_array_equal(per["k"], per_q["k"])
    assert float(nsum.sum()) > 0 and float(nsum_q.abs().sum()) == 0.0 and float(np.abs(per_q["chi2"]).sum()) == 0.0

    parts = [np.arange(300)[::-1].copy(), np.arange(3, 300, 11), np.arange(5, 40)]  # 300 rows: two reads of 256
    alone = []
    for k, rows in enumerate(parts):
        eng._seed_class(k, idx, per, rows)
        alone.append((eng.state.num[k].clone(), eng.state.den[k].clone(), float(eng.state.counts[k])))
    eng._seed_classes([2, 0, 1], idx, per, [parts[2], parts[0], parts[1]])
    for k, (n_k, d_k, c_k) in enumerate(alone):
        torch.testing.assert_close(eng.state.num[k], n_k, rtol=1e-5, atol=1e-6 * float(n_k.abs().max()))
        torch.testing.assert_close(eng.state.den[k], d_k, rtol=1e-5, atol=1e-6 * float(d_k.abs().max()))
        assert float(eng.state.counts[k]) == c_k == len(parts[k])


def test_sums_at_grid_angles_share_back_rotations_with_the_same_result(particles3, monkeypatch):
    """Particles whose angles lie on a grid (the starting classes', a re-seeded class's) are summed per
    (class, angle) and folded by quarter turns before the back-rotation: the sums of one back-rotation
    per particle to float32 rounding, with far fewer back-rotated rows. Angles off the grid go one by one."""
    import torch

    import cryo2d.em.mstep as mstep
    from cryo2d.em.engine import Engine
    from cryo2d.em.rotation import psi_grid

    eng = Engine(particles3, EMConfig(n_classes=2, seed=0))
    rng = np.random.default_rng(2)
    idx = np.sort(rng.choice(len(particles3), size=240, replace=False))
    labels = torch.from_numpy(rng.integers(0, 2, size=240))
    grid = psi_grid(5.0)  # 72 angles: four a quarter turn apart fold into one row
    psi = grid[torch.from_numpy(rng.integers(0, len(grid), size=240))]
    shifts = torch.from_numpy(rng.uniform(-2, 2, size=(240, 2))).float()
    rows = []
    real = mstep.unrotate_sums
    monkeypatch.setattr(mstep, "unrotate_sums", lambda S, Q, p, xy, zp: rows.append(len(p)) or real(S, Q, p, xy, zp))

    def sums(**kw):
        rows.clear()
        (num, den, counts), _ = eng._read_fixed(idx, labels, psi, n_classes=2, shifts_px=shifts, **kw)
        return num, den, counts, sum(rows)

    num1, den1, c1, n1 = sums()
    num2, den2, c2, n2 = sums(grid=grid)
    assert n1 == 240 and n2 <= 2 * len(grid) // 4  # one row per particle; at most K · 18 folded rows
    assert torch.equal(c1, c2)
    torch.testing.assert_close(num2, num1, rtol=1e-4, atol=1e-4 * float(num1.abs().max()))
    torch.testing.assert_close(den2, den1, rtol=1e-4, atol=1e-4 * float(den1.abs().max()))
    psi = psi + 0.01  # off the grid: one by one, as without it
    num3, den3, _, n3 = sums(grid=grid)
    num4, den4, _, _ = sums()
    assert n3 == 240 and torch.equal(num3, num4) and torch.equal(den3, den4)


def test_plans_of_one_grid_share_their_set_up_and_masked_views_follow_the_classes(particles3):
    """Two plans of the same grid (another temperature) share Engine._plan_setup's set-up, another radius
    does not; Engine._masked_views makes again only the classes that changed, with the values a fresh
    computation gives (to the rounding of a batch of another size)."""
    import dataclasses

    import torch

    from cryo2d.em.engine import Engine

    eng = Engine(particles3, EMConfig(n_classes=3, seed=0))
    eng.initialise()
    plan = eng.plan(0, online=True)
    setup = eng._plan_setup(plan)
    assert eng._plan_setup(eng.plan(5, online=True)) is setup  # a new plan object of the same grid
    assert eng._plan_setup(dataclasses.replace(plan, temperature=plan.temperature + 1.0)) is setup
    other = eng._plan_setup(dataclasses.replace(plan, r_mstep=3.0))
    assert other is not setup and other[1] is not None  # the M-step's points within the smaller radius

    psi0 = plan.psi_rad[:1]
    s = eng.state

    def fresh():
        grids = eng._grid(eng._to_points(eng._to_real(s.A) * eng.mask))
        return grids, rotate_classes(grids, eng.mpts.xy, psi0, eng.config.zeropad)[:, 0]

    grids, A0 = (v.clone() for v in eng._masked_views(psi0))
    want_g, want_a = fresh()
    torch.testing.assert_close(grids, want_g, rtol=1e-5, atol=1e-5 * float(want_g.abs().max()))
    torch.testing.assert_close(A0, want_a, rtol=1e-5, atol=1e-5 * float(want_a.abs().max()))
    s.A[1] = s.A[1] * torch.polar(torch.ones(len(eng.mpts)), torch.linspace(0, 3, len(eng.mpts)))
    grids2, A02 = eng._masked_views(psi0)
    assert torch.equal(grids2[0], grids[0]) and torch.equal(grids2[2], grids[2])  # kept
    assert torch.equal(A02[0], A0[0]) and torch.equal(A02[2], A0[2])
    want_g, want_a = fresh()
    assert float((grids2[1] - grids[1]).abs().max()) > 0.1 * float(grids[1].abs().max())  # made again
    torch.testing.assert_close(grids2[1], want_g[1], rtol=1e-5, atol=1e-5 * float(want_g.abs().max()))
    torch.testing.assert_close(A02[1], want_a[1], rtol=1e-5, atol=1e-5 * float(want_a.abs().max()))
