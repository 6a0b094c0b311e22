"""Each DESIGN §2 parameter changes the computation as described (tiny problems)."""
from __future__ import annotations

import math
from dataclasses import replace

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from test_rotation import rotation_error

import cryo2d.em.engine as engine_mod
from cryo2d.classify import classify, finalize
from cryo2d.em.config import EMConfig
from cryo2d.em.engine import EMResult, Engine, run_em, temperature_at
from cryo2d.em.finalize import vertical_rotation_deg
from cryo2d.em.mstep import PoseSums
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import radius_grid, resize_images, rotate_images


@pytest.fixture(scope="module")
def noisy(bundled_volume, helpers):
    """300 particles, 32 px, SNR 0.05, three views: posteriors are not all 0 or 1."""
    from cryo2d.simulate import simulate

    sim = simulate(*bundled_volume, n_particles=300, box=32, snr=0.05, junk_fraction=0.0,
                   views="discrete", n_views=3, rare_view_fraction=1 / 3, seed=1)
    return helpers.memory_particles(sim.images, sim.pixel_size_angst, ctf=sim.ctf)


def _run(particles, helpers, **kw) -> EMResult:
    return run_em(particles, helpers.tiny_config(**kw))


@pytest.fixture(scope="module")
def baseline(particles3, helpers) -> EMResult:
    """``sim3`` with the tiny configuration's defaults: the reference run that options change."""
    return _run(particles3, helpers)


def _plan(particles, config, resolved=True):
    eng = Engine(particles, config)
    if resolved:
        eng.state.r_res = eng.state.r_res_sums = 1e3  # as if the classes were resolved to Nyquist: the plan's cap shows
    return eng, eng.plan(5, online=True)


def _differ(a: EMResult, b: EMResult) -> bool:
    return not np.allclose(a.classes, b.classes, atol=1e-6) or not np.array_equal(a.class_index, b.class_index)


# ------------------------------------------------------------ resolution limits
def test_max_align_res_caps_the_e_step_radius(particles3, helpers):
    _, full = _plan(particles3, helpers.tiny_config())
    assert full.r_cur == pytest.approx(15.0)  # Nyquist of the 32 px box (max-res 6 Å is finer)
    eng, plan = _plan(particles3, helpers.tiny_config(max_align_res_angst=60.0))
    r_align = 32 * 11.4 / 60.0
    assert eng.geom.r_align == pytest.approx(r_align)
    assert plan.r_cur == pytest.approx(r_align)
    assert float(plan.points.xy.norm(dim=1).max()) <= r_align + 1e-6
    assert len(plan.points) < len(full.points)
    assert eng.geom.r_max == pytest.approx(15.0)  # class averages keep their resolution


def test_min_align_res_removes_low_frequencies(particles3, helpers):
    _, full = _plan(particles3, helpers.tiny_config())
    assert float(full.points.xy.norm(dim=1).min()) == pytest.approx(1.0)
    eng, plan = _plan(particles3, helpers.tiny_config(min_align_res_angst=100.0))
    r_min = 32 * 11.4 / 100.0
    assert eng.geom.r_min_align == pytest.approx(r_min)
    assert float(plan.points.xy.norm(dim=1).min()) >= r_min - 1e-6
    assert len(plan.points) < len(full.points)


def test_the_search_resolution_is_measured_within_the_high_pass(particles3, helpers):
    """Under --min-align-res the classes' SSNR below the band says nothing about the search: the
    resolution that sets the search radius starts at the band's first shell (it was held at shell 2,
    where the low shells' SSNR fell to about 0, and the search at its floor radius all run)."""
    from cryo2d.em.mstep import resolution_shell

    snr = torch.tensor([[50.0, 40.0, 9.0, 0.0, 0.0, 3.0, 8.0, 2.0, 0.5, 0.1]])
    assert resolution_shell(snr).tolist() == [2]
    assert resolution_shell(snr, start=5).tolist() == [7]
    assert resolution_shell(snr, start=0).tolist() == resolution_shell(snr).tolist()
    eng, _ = _plan(particles3, helpers.tiny_config(min_align_res_angst=100.0))  # r_min_align 3.6: shells 5 on
    occupied = torch.ones(1, dtype=torch.bool)
    assert eng._resolution(snr, occupied)[1] == 7.0
    eng, _ = _plan(particles3, helpers.tiny_config())
    assert eng._resolution(snr, occupied)[1] == 2.0


def test_max_res_crops_the_working_box(particles3, helpers):
    eng, plan = _plan(particles3, helpers.tiny_config(max_res_angst=60.0))
    assert eng.geom.work_box < 32
    result = _run(particles3, helpers, max_res_angst=60.0, n_online_iterations=1)
    assert result.classes.shape == (3, 32, 32)  # back at the input box


# ------------------------------------------------------------ written averages
def _median_ncc(result: EMResult, sim) -> float:
    """Median NCC of the particle classes with the true projection of their dominant view."""
    from cryo2d.evaluate import best_ncc, class_details

    details = class_details(sim.truth["view"].to_numpy(), result.class_index)
    return float(np.median([best_ncc(result.classes[d.label], sim.view_projections[d.dominant_view])
                            for d in details if not d.is_junk_class]))


def test_average_pass_writes_the_classes_beyond_max_res(sim3, particles3, helpers):
    """Searched at 60 Å (an 18 px working box), written at Nyquist (22.8 Å): closer to the true views."""
    at_max_res = _run(particles3, helpers, max_res_angst=60.0, average_res_angst=60.0)
    at_nyquist = _run(particles3, helpers, max_res_angst=60.0)
    # The pass keeps the classes of the particles and refines their poses within half a grid step.
    np.testing.assert_array_equal(at_nyquist.class_index, at_max_res.class_index)
    step = at_max_res.history[-1]["psi_step_deg"]
    turn = (at_nyquist.psi_deg - at_max_res.psi_deg + 180.0) % 360.0 - 180.0
    assert np.abs(turn).max() <= step / 2 + 1e-3 and np.abs(turn).max() > 0
    assert [r["phase"] for r in at_max_res.history][-1] == "full"
    assert at_nyquist.history[-1]["phase"] == "average"
    assert at_nyquist.history[-1]["particles"] == len(particles3)
    coarse, fine = _median_ncc(at_max_res, sim3.sim), _median_ncc(at_nyquist, sim3.sim)
    assert fine > coarse + 0.01, (coarse, fine)  # measured 0.947 -> 0.969
    assert fine > 0.96
    assert at_nyquist.resolution_angst.min() < 40.0 < at_max_res.resolution_angst.min()


def test_average_pass_keeps_the_runs_noise_model_and_extends_it(particles3, helpers):
    eng = Engine(particles3, helpers.tiny_config(max_res_angst=60.0))
    eng.initialise()
    for it in range(4):
        eng.iterate(it)
    fine = eng.average_pass()
    assert (eng.geom.work_box, fine.geom.work_box) == (18, 32)
    s, f = eng.state, fine.state
    refined = s.noise_cnt > 0
    assert int(refined.sum()) >= 6
    torch.testing.assert_close(f.sigma2_shell[: len(refined)][refined], s.sigma2_shell[refined])
    assert len(f.sigma2_shell) == 17 and bool((f.sigma2_shell > 0).all())
    assert float(f.counts.sum()) == pytest.approx(len(particles3))  # every particle once, at its best class
    np.testing.assert_array_equal(f.counts.cpu().numpy(), np.bincount(s.class_index, minlength=3))
    # Nothing to add at the run's own resolution, or when the run already reaches the finer one.
    assert Engine(particles3, helpers.tiny_config(max_res_angst=60.0, average_res_angst=60.0)).average_pass() is None
    assert Engine(particles3, helpers.tiny_config()).average_pass() is None  # 6 Å is beyond Nyquist here


def test_default_average_res_skips_a_pass_that_adds_little(particles3, helpers):
    """At --max-res 26 Å, Nyquist (22.8 Å) widens the radius by 7 %: no pass unless asked for."""
    for average_res, runs in ((None, False), (22.8, True)):
        eng = Engine(particles3, helpers.tiny_config(max_res_angst=26.0, average_res_angst=average_res))
        eng.initialise()
        eng.iterate(0)
        assert (eng.average_pass() is not None) == runs, average_res


def test_default_average_pass_widens_only_for_classes_that_reach_the_band(particles3, helpers):
    """Classes whose SSNR falls to 1 well inside the run's band are written as the last iteration left them."""
    eng = Engine(particles3, helpers.tiny_config(max_res_angst=60.0))
    eng.initialise()
    for it in range(4):
        eng.iterate(it)
    s, r_max = eng.state, eng.geom.r_max
    grid_psi = s.psi_rad.copy()
    s.r_res = 0.5 * r_max  # classes that stop halfway: nothing to add beyond the band
    assert eng.geom.work_box == 18 and eng.average_pass() is None
    assert np.array_equal(s.psi_rad, grid_psi)  # no pass: the poses stay on the search's grid
    s.r_res = r_max  # classes that reach the band's edge: written at Nyquist
    fine = eng.average_pass()
    assert fine.geom.work_box == 32
    assert float(fine.state.counts.sum()) == pytest.approx(len(particles3))
    turn = (s.psi_rad - grid_psi + np.pi) % (2 * np.pi) - np.pi
    assert np.abs(turn).max() > 0  # the pass refines the poses first
    # Asked for explicitly, the resolution is used whatever the classes reach.
    eng2 = Engine(particles3, helpers.tiny_config(max_res_angst=60.0, average_res_angst=22.8))
    eng2.initialise()
    eng2.iterate(0)
    eng2.state.r_res = 0.5 * eng2.geom.r_max
    assert eng2.average_pass().geom.work_box == 32


def test_average_pass_white_noise_keeps_one_sigma2(particles3, helpers):
    eng = Engine(particles3, helpers.tiny_config(max_res_angst=60.0, white_noise=True))
    eng.initialise()
    eng.iterate(0)
    sigma2 = eng.average_pass().state.sigma2_shell
    torch.testing.assert_close(sigma2, torch.full_like(sigma2, float(eng.state.sigma2_shell[1])))


def test_average_res_must_not_be_coarser_than_max_res():
    with pytest.raises(Cryo2DError, match=r"--average-res 8 Å is a lower resolution \(larger Å\) than --max-res 6 Å"):
        EMConfig(max_res_angst=6.0, average_res_angst=8.0).validate()
    EMConfig(max_res_angst=6.0, average_res_angst=6.0).validate()
    EMConfig(max_res_angst=6.0).validate()


# ------------------------------------------------------------ noise model
def test_white_noise_gives_one_sigma2(particles3, helpers):
    white = Engine(particles3, helpers.tiny_config(white_noise=True))
    white.initialise()
    s = white.state.sigma2_shell
    assert torch.allclose(s, s[1].expand_as(s))
    coloured = Engine(particles3, helpers.tiny_config())
    coloured.initialise()
    c = coloured.state.sigma2_shell[1:]
    assert float(c.max() / c.min()) > 2.0


def test_white_noise_changes_the_result(noisy, helpers):
    assert _differ(_run(noisy, helpers, white_noise=True), _run(noisy, helpers))


# ------------------------------------------------------------ force max / hard last
class _Spy:
    """Records the E-step modes and the M-step entries of each iteration."""

    def __init__(self, monkeypatch):
        self.modes: list[list[str]] = [[]]
        self.entries: list[list[tuple]] = [[]]
        real_add = PoseSums.add
        spy = self

        def wrap(real):
            def e_step(*args, **kw):
                spy.modes[-1].append(kw.get("mode"))
                return real(*args, **kw)

            return e_step

        def add(self_, X, ctf, scale, phases, res):
            if res.entry_i.numel() and res.class_post.shape[0] != X.shape[0]:
                raise AssertionError("class_post and X disagree")
            spy.entries[-1].append((res.entry_i.clone(), res.entry_k.clone(), res.entry_w.clone()))
            return real_add(self_, X, ctf, scale, phases, res)

        for name in ("e_step", "e_step_coarse_to_fine"):  # exhaustive and coarse-to-fine searches
            if hasattr(engine_mod, name):
                monkeypatch.setattr(engine_mod, name, wrap(getattr(engine_mod, name)))
        monkeypatch.setattr(PoseSums, "add", add)

    def next_iteration(self, record):
        self.modes.append([])
        self.entries.append([])

    def run(self, particles, config):
        return run_em(particles, config, on_iteration=self.next_iteration)


def _classes_per_particle(chunks):
    """Per chunk-local particle: number of distinct classes and total weight of its entries."""
    out = []
    for i, k, w in chunks:
        for p in torch.unique(i):
            sel = i == p
            out.append((len(torch.unique(k[sel])), float(w[sel].sum())))
    return out


def test_force_max_on_takes_each_class_at_one_pose(noisy, helpers, monkeypatch):
    """Force max over poses: a particle gives each probable class one pose, weighted by that class's
    posterior (several classes early on), where marginalising gives a class several poses."""
    spy = _Spy(monkeypatch)
    spy.run(noisy, helpers.tiny_config(force_max=True))
    # each iteration's pass (the class moves' growing passes search their seeds in "hard" mode)
    assert all(ms[0] == "max_pose" and set(ms) <= {"max_pose", "hard"} for ms in spy.modes[:-2])
    assert set(spy.modes[-2]) == {"hard_class"}  # the final full pass (hard_last)
    for it in spy.entries[:-2]:
        for i, k, _ in it:
            assert len(torch.unique(i * 100 + k)) == len(i)  # one pose per (particle, class)
    online = _classes_per_particle(spy.entries[0])
    assert all(w == pytest.approx(1.0, abs=1e-4) for _, w in online)
    assert any(n > 1 for n, _ in online)  # the first iteration's flat posteriors share particles
    final = _classes_per_particle(spy.entries[-2])
    assert len(final) == 300 and all(n == 1 and w == pytest.approx(1.0, abs=1e-4) for n, w in final)

    soft = _Spy(monkeypatch)
    soft.run(noisy, helpers.tiny_config(force_max=False))
    online = [chunk for it in soft.entries[:-2] for chunk in it]
    assert any(len(torch.unique(i * 100 + k)) < len(i) for i, k, _ in online)  # several poses of one class


def test_force_max_with_many_particles_per_class_gives_hard_assignments(noisy, helpers, monkeypatch):
    """From engine.MAX_POSE_BELOW particles per class on, each particle goes to its one best (class, pose)."""
    from cryo2d.em.engine import MAX_POSE_BELOW

    assert 2 * MAX_POSE_BELOW <= len(noisy) < 3 * MAX_POSE_BELOW  # K = 2 is past the bound, K = 3 (above) under it
    spy = _Spy(monkeypatch)
    spy.run(noisy, helpers.tiny_config(force_max=True, n_classes=2))
    assert {m for ms in spy.modes for m in ms} == {"hard"}
    for it in spy.entries[:-1]:
        for i, _, w in it:
            assert torch.equal(i, torch.arange(len(i))) and torch.equal(w, torch.ones_like(w))


def test_force_max_without_hard_last_keeps_the_final_pass_at_one_pose_per_class(noisy, helpers, monkeypatch):
    spy = _Spy(monkeypatch)
    spy.run(noisy, helpers.tiny_config(force_max=True, hard_last=False))
    assert set(spy.modes[-2]) == {"max_pose"}
    final = _classes_per_particle(spy.entries[-2])
    assert len(final) == 300 and any(n > 1 for n, _ in final)


def test_force_max_off_gives_fractional_posteriors(noisy, helpers, monkeypatch):
    spy = _Spy(monkeypatch)
    result = spy.run(noisy, helpers.tiny_config(force_max=False))
    assert all(m == "soft" for ms in spy.modes[:-2] for m in ms)
    online = _classes_per_particle(spy.entries[0])
    assert any(n > 1 for n, _ in online)  # some particles contribute to several classes
    assert all(w == pytest.approx(1.0, abs=1e-4) for _, w in online)
    assert (result.class_posterior < 0.99).any()
    assert ((result.class_posterior > 0) & (result.class_posterior <= 1 + 1e-6)).all()
    assert (result.class_ess >= 1 - 1e-6).all() and (result.class_ess > 1.05).any()


def test_force_max_default_follows_the_number_of_classes():
    assert EMConfig(n_classes=20).force_max_effective is False
    assert EMConfig(n_classes=21).force_max_effective is True
    assert EMConfig(n_classes=3, force_max=True).force_max_effective is True


def test_hard_last_puts_each_particle_in_one_class(noisy, helpers, monkeypatch):
    spy = _Spy(monkeypatch)
    spy.run(noisy, helpers.tiny_config(force_max=False, hard_last=True, n_full_iterations=1))
    assert set(spy.modes[-2]) == {"hard_class"}  # the final full pass
    final = _classes_per_particle(spy.entries[-2])
    assert len(final) == 300
    assert all(n == 1 and w == pytest.approx(1.0, abs=1e-4) for n, w in final)


def test_no_hard_last_keeps_the_final_pass_soft(noisy, helpers, monkeypatch):
    spy = _Spy(monkeypatch)
    spy.run(noisy, helpers.tiny_config(force_max=False, hard_last=False, n_full_iterations=1))
    assert set(spy.modes[-2]) == {"soft"}
    final = _classes_per_particle(spy.entries[-2])
    assert any(n > 1 for n, _ in final)


# ------------------------------------------------------------ annealing
def test_temperature_schedule():
    cfg = EMConfig(uncertainty_factor=4.0, anneal_start=2, anneal_iterations=3)
    temps = [temperature_at(cfg, it) for it in range(8)]
    assert temps[:2] == [4.0, 4.0]  # ICUF before the annealing starts
    assert temps[2] == pytest.approx(3.0) and temps[3] == pytest.approx(2.0)
    assert temps[4:] == [1.0] * 4  # estimated noise after anneal_start + anneal_iterations
    assert all(a >= b for a, b in zip(temps, temps[1:]))
    assert temperature_at(EMConfig(uncertainty_factor=1.0), 0) == 1.0
    assert temperature_at(EMConfig(uncertainty_factor=3.0, anneal_start=0, anneal_iterations=0), 0) == 1.0


def test_anneal_schedule_reaches_the_log_and_the_result(noisy, helpers):
    kw = dict(uncertainty_factor=8.0, anneal_start=1, anneal_iterations=2, n_online_iterations=4)
    result = _run(noisy, helpers, **kw)
    cfg = helpers.tiny_config(**kw)
    temps = [h["temperature"] for h in result.history]
    assert temps == [pytest.approx(temperature_at(cfg, it), abs=1e-3) for it in range(4)] + [1.0]
    assert temps[0] == 8.0 and temps[3] == 1.0
    assert _differ(result, _run(noisy, helpers, **{**kw, "uncertainty_factor": 1.0}))
    assert _differ(result, _run(noisy, helpers, **{**kw, "anneal_start": 3}))


# ------------------------------------------------------------ references
def test_zeropad_changes_the_rotated_references(particles3, helpers, baseline):
    assert rotation_error(37.0, 2) < 0.5 * rotation_error(37.0, 1)
    assert helpers.tiny_config().zeropad == 2
    assert _differ(_run(particles3, helpers, zeropad=1), baseline)


def test_mask_diameter_changes_the_mask_and_the_classes(particles3, helpers, baseline):
    default = Engine(particles3, helpers.tiny_config())
    masked = Engine(particles3, helpers.tiny_config(mask_diameter_angst=200.0))
    r = radius_grid(32)
    assert float(default.mask[r <= 16].min()) == 1.0  # corners only
    inner = 200.0 / 2 / 11.4
    assert float(masked.mask[r <= inner].min()) == 1.0
    assert float(masked.mask[r >= 1.2 * inner + 1e-3].max()) == 0.0
    assert _differ(_run(particles3, helpers, mask_diameter_angst=200.0), baseline)


def test_auto_mask_follows_each_class_and_changes_the_search(particles3, helpers, baseline):
    """Each class's search mask covers its own density (dilated) and nothing far from it."""
    eng = Engine(particles3, helpers.tiny_config())
    assert eng.config.auto_mask
    yy, xx = np.mgrid[:32, :32] - 16
    dist = np.hypot(xx - 4, yy + 3)  # a disc of radius 5 px off centre at (x, y) = (+4, -3)
    classes = torch.zeros((3, 32, 32))
    classes[0] = torch.as_tensor((dist <= 5).astype(np.float32))
    classes[2] = -classes[0]  # black particles: the same mask
    masks = eng._support_masks(classes).numpy()
    assert masks.min() >= 0 and masks.max() <= 1 and np.all(masks <= eng.mask.numpy() + 1e-6)
    assert masks[0][dist <= 6].min() > 0.95  # the disc and a margin
    assert masks[0][dist >= 12].max() < 0.05  # nothing far from it
    assert masks[1].max() == 0  # a zero class (the empty-box class) masks everything
    np.testing.assert_allclose(masks[2], masks[0], atol=1e-6)
    # A separate blob above the threshold is kept when it reaches half the class's peak (a second
    # domain), dropped when it does not (the noise a small class carries).
    blob = np.hypot(xx + 7, yy - 6) <= 2.5  # at (x, y) = (-7, +6), 17 px from the disc
    for height, kept in ((0.8, True), (0.3, False)):
        two = classes[:1] + height * torch.as_tensor(blob.astype(np.float32))
        m = eng._support_masks(two).numpy()[0]
        assert m[dist <= 6].min() > 0.95
        assert (m[blob].min() > 0.95) if kept else (m[blob].max() < 0.05), height
    assert _differ(_run(particles3, helpers, auto_mask=False), baseline)


@pytest.mark.parametrize("fill", ["kernel", "torch"])
def test_strong_regions_match_a_labelling_of_the_8_connected_regions(fill, monkeypatch):
    """Regions kept by growing the strong pixels equal those whose labelled maximum reaches the level:
    the CPU's flood fill and the GPU's torch steps (run here on the CPU) alike."""
    from scipy import ndimage

    if fill == "torch":
        monkeypatch.setattr(engine_mod.kernels, "available", lambda device: False)
    elif not engine_mod.kernels.available("cpu"):
        pytest.skip("Numba not installed")

    rng = np.random.default_rng(0)
    eight = np.zeros((3, 3, 3), dtype=bool)
    eight[1] = True  # 8-connected within an image, never across images
    for trial in range(60):
        k, b = int(rng.integers(1, 6)), int(rng.integers(5, 70))
        raw = torch.as_tensor(rng.random((k, 1, b, b)), dtype=torch.float32)
        density = torch.nn.functional.avg_pool2d(raw, 3, 1, 1)[:, 0] ** 3
        peak = density.amax(dim=(1, 2), keepdim=True)
        support = density > float(rng.uniform(0.05, 0.5)) * peak
        if trial == 0:
            support[:] = False
        if trial == 1:  # a one-pixel-wide spiral: the growth must follow it to its end
            support[:] = False
            support[0, 1:-1:2, 1:-1] = True
            support[0, 2:-1:4, -2] = True
            support[0, 4:-1:4, 1] = True
            density[0] = 0.0
            density[0, 1, 1] = 1.0
        level = 0.6 * peak if trial != 1 else torch.full((k, 1, 1), 0.5)
        labels, n = ndimage.label(support.numpy(), structure=eight)
        peaks = ndimage.maximum(density.numpy(), labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        owner = ndimage.minimum(np.broadcast_to(np.arange(k)[:, None, None], labels.shape), labels, np.arange(1, n + 1))
        strong = np.concatenate([[False], peaks >= level.flatten().numpy()[np.asarray(owner, dtype=np.int64)]])
        kept = engine_mod._keep_strong_regions(support, density, level)
        assert kept.dtype == torch.float32
        np.testing.assert_array_equal(kept.numpy(), strong[labels].astype(np.float32))


def test_clamp_solvent_zeroes_pixels_outside_the_mask(particles3, helpers):
    kw = dict(mask_diameter_angst=200.0, n_online_iterations=2)
    outside = (radius_grid(32) > 1.2 * 200.0 / 2 / 11.4 + 1).numpy()
    clamped = _run(particles3, helpers, clamp_solvent=True, **kw).classes
    free = _run(particles3, helpers, flatten_solvent=False, **kw).classes
    peak = np.abs(clamped).max(axis=(1, 2))
    assert (peak > 0).sum() >= 2
    clamped, free, peak = clamped[peak > 0], free[peak > 0], peak[peak > 0]  # an empty class is all zero
    # The written classes are exactly zero beyond the mask's outer edge.
    assert (clamped[:, outside] == 0).all()
    assert np.abs(free[:, outside]).mean() > 3 * np.abs(clamped[:, outside]).mean()


def test_flatten_solvent_writes_each_class_times_its_own_mask(particles3, helpers, baseline):
    """The written classes are the unflattened ones times each class's mask (the circular one without --auto-mask)."""
    free = _run(particles3, helpers, flatten_solvent=False)
    assert np.array_equal(free.class_index, baseline.class_index)  # the search is the same
    eng = Engine(particles3, helpers.tiny_config())
    assert eng.geom.work_box == 32  # no Fourier crop: the circle of the search is that of the written box
    masks = eng._support_masks(torch.as_tensor(free.classes)).numpy()
    np.testing.assert_allclose(baseline.classes, free.classes * masks, atol=1e-5 * np.abs(free.classes).max())
    np.testing.assert_array_equal(baseline.classes_unmasked, free.classes)  # kept for the junk scores
    assert free.classes_unmasked is None
    occupied = np.abs(free.classes).max(axis=(1, 2)) > 0
    solvent = masks[occupied] < 1e-3
    assert solvent.mean(axis=(1, 2)).min() > 0.2  # each class has solvent, zero in the written class
    assert np.abs(free.classes[occupied][solvent]).mean() > 0  # and not zero before
    # Without the automatic masks, the circular mask alone (here: 200 Å on 11.4 Å pixels).
    circ = dict(auto_mask=False, mask_diameter_angst=200.0)
    flat, raw = _run(particles3, helpers, **circ), _run(particles3, helpers, flatten_solvent=False, **circ)
    circle = Engine(particles3, helpers.tiny_config(**circ)).mask.numpy()
    assert circle.min() == 0
    np.testing.assert_allclose(flat.classes, raw.classes * circle[None], atol=1e-6)


def test_non_negative_classes(particles3, helpers):
    kw = dict(n_online_iterations=2)
    pos = _run(particles3, helpers, non_negative=True, **kw).classes
    free = _run(particles3, helpers, **kw).classes
    pos = pos[pos.max(axis=(1, 2)) > 0]  # an empty class is all zero
    assert len(pos) >= 2
    free = free[free.max(axis=(1, 2)) > 0]
    # The written classes are non-negative exactly (the M-step's clamp holds up to ringing).
    assert (pos >= 0).all()
    negative_mass = lambda c: np.clip(-c, 0, None).sum() / np.clip(c, 0, None).sum()  # noqa: E731
    assert negative_mass(pos) < 0.5 * negative_mass(free)


def _com(images: np.ndarray) -> np.ndarray:
    """Centre of mass (x, y) of positive pixels above 20 % of the max, relative to box//2."""
    out = []
    for img in images:
        w = np.where(img > 0.2 * img.max(), img, 0.0)
        b = img.shape[-1]
        y, x = np.mgrid[:b, :b] - b // 2
        out.append([(w * x).sum() / w.sum(), (w * y).sum() / w.sum()])
    return np.array(out)


@pytest.fixture(scope="module")
def off_centre(helpers):
    """200 noisy copies of one asymmetric object whose centre of mass is 5 px right of the centre."""
    rng = np.random.default_rng(0)
    b = 32
    y, x = np.mgrid[:b, :b] - b // 2
    obj = np.exp(-((x - 5) ** 2 + y**2) / 8.0) + 0.5 * np.exp(-((x - 7) ** 2 + (y - 3) ** 2) / 4.0)
    images = 3 * obj[None] + rng.normal(0, 0.3, (200, b, b))
    return helpers.memory_particles(images, 5.0), obj


def test_recenter_moves_an_off_centre_class_to_the_centre(off_centre, helpers):
    particles, obj = off_centre
    kw = dict(n_classes=1, n_online_iterations=4, batch_size_per_class=60, use_ctf=False, shift_range_px=7.0,
              psi_step_deg=10.0)
    true_offset = np.hypot(*_com(obj[None])[0])
    on = np.hypot(*_com(run_em(particles, helpers.tiny_config(recenter=True, **kw)).classes).T)
    off = np.hypot(*_com(run_em(particles, helpers.tiny_config(recenter=False, **kw)).classes).T)
    assert on[0] < 1.5
    assert off[0] > 0.6 * true_offset


# ------------------------------------------------------------ scale, filaments, CTF
def test_estimate_scale_follows_the_true_scale(sim3, particles3, helpers, baseline):
    truth = sim3.truth["scale"].to_numpy()
    est = _run(particles3, helpers, estimate_scale=True).scale
    assert np.corrcoef(est, truth)[0, 1] > 0.5
    # Normalised as RELION normalises its scale corrections: without it the
    # classes' Wiener shrinkage pushed them up (median 1.10 here, 2.2 after 40
    # iterations of the 48 px test set).
    assert np.median(est) == pytest.approx(np.median(truth), abs=0.03)
    assert not np.allclose(est, 1.0)
    assert np.array_equal(baseline.scale, np.ones(len(truth)))


def _rod(box: int, axis_deg: float, length: float = 60.0, width: float = 3.0) -> np.ndarray:
    """A Gaussian rod whose long axis is ``axis_deg`` from x (columns), counter-clockwise towards y (rows)."""
    y, x = np.mgrid[:box, :box] - box // 2
    a = math.radians(axis_deg)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    return np.exp(-(u**2) / length - v**2 / width).astype(np.float32)


def _segment(box: int, axis_deg: float) -> np.ndarray:
    """A filament segment as a tilted one projects: 26 px wide, 56 px long, four ridges along the axis,
    its edges brighter at opposite ends (axis in degrees from x, counter-clockwise towards y)."""
    y, x = np.mgrid[:box, :box] - box // 2
    a = math.radians(axis_deg)
    along, across = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    ridges = (np.abs(across) < 13) * (np.abs(along) < 28) * (1 + np.cos(2 * math.pi * across / 6.5))
    gain = 1 + 1.5 * np.clip(across / 13, -1, 1) * np.clip(along / 28, -1, 1)
    return (ridges * gain).astype(np.float32)


@pytest.mark.parametrize("axis_deg", [77.0, 96.0, 30.0, 150.0])
@pytest.mark.parametrize("box", [64, 128])
def test_the_long_axis_turns_vertical(axis_deg, box):
    """vertical_rotation_deg turns rods and filament segments to vertical within 1°, at 64 px and resized from 128 px.

    rotate_images turns an image counter-clockwise in (column, row) coordinates, so
    an axis at a° needs a turn of 90° − a. The segment's bright edges pull the second
    moments of its bright pixels (the axis used before session 46) 18° off.
    """
    scale = box / 64
    images = [_rod(box, axis_deg, 60.0 * scale**2, 3.0 * scale**2), _segment(64, axis_deg)]
    if box != 64:
        images[1] = resize_images(torch.from_numpy(images[1]), box).numpy()
    turn = vertical_rotation_deg(np.stack(images))
    for t in turn:
        assert (t - (90.0 - axis_deg) + 90.0) % 180.0 - 90.0 == pytest.approx(0.0, abs=1.0), turn
    assert vertical_rotation_deg(np.zeros((2, box, box)))[0] == 0.0  # flat: no turn


def test_align_filaments_makes_the_axis_vertical(helpers):
    b = 32
    rod = _rod(b, 30.0)
    n = 4
    result = EMResult(
        classes=rod[None], counts=np.array([n], float), resolution_angst=np.array([20.0]),
        class_index=np.zeros(n, np.int64), psi_deg=np.array([0.0, 10.0, 100.0, 350.0]),
        shift_px=np.zeros((n, 2)), max_prob=np.ones(n), class_posterior=np.ones(n), class_ess=np.ones(n),
        scale=np.ones(n), history=[], geometry=None,
    )
    particles = helpers.memory_particles(np.zeros((n, b, b)), 4.0)
    cfg = EMConfig(n_classes=1, align_filaments=True, remove_duplicates=False)
    aligned = finalize(result, particles, cfg)
    plain = finalize(result, particles, EMConfig(n_classes=1, remove_duplicates=False))
    assert np.corrcoef(aligned.classes[0].ravel(), _rod(b, 90.0).ravel())[0, 1] > 0.98
    np.testing.assert_allclose(plain.assignments.psi_deg, result.psi_deg)
    shift = (result.psi_deg - aligned.assignments.psi_deg) % 360
    np.testing.assert_allclose(shift, shift[0], atol=1e-6)  # every particle moves by the same φ
    assert shift[0] % 180 == pytest.approx(60.0, abs=2.0)
    # The particle model is unchanged: rotate(new class, new ψ) = rotate(old class, old ψ).
    old = rotate_images(torch.from_numpy(np.repeat(rod[None], n, 0)), torch.from_numpy(result.psi_deg))
    new = rotate_images(torch.from_numpy(np.repeat(aligned.classes[:1], n, 0)),
                        torch.from_numpy(aligned.assignments.psi_deg))
    for o, w in zip(old.numpy(), new.numpy()):
        assert np.corrcoef(o.ravel(), w.ravel())[0, 1] > 0.98
    # The unmasked averages (flat solvent) turn by the same angle as the written ones.
    assert aligned.classes_unmasked is None
    both = finalize(replace(result, classes_unmasked=2 * rod[None]), particles, cfg)
    np.testing.assert_allclose(both.classes_unmasked, 2 * both.classes, atol=1e-5)


def test_no_ctf(sim3, helpers, baseline):
    images = sim3.sim.images
    bare = helpers.memory_particles(images, sim3.sim.pixel_size_angst, ctf=None)
    result = run_em(bare, helpers.tiny_config(use_ctf=False))
    assert np.isfinite(result.classes).all() and (result.class_index >= 0).all()
    assert _differ(result, baseline)  # the same images with CTF correction
    with pytest.raises(Cryo2DError, match="no-ctf"):
        run_em(bare, helpers.tiny_config())


# ------------------------------------------------------------ search grid
@pytest.mark.parametrize("psi_step,n_psi", [(10.0, 36), (30.0, 12), (7.5, 48)])
def test_psi_step_sets_the_angle_grid(particles3, helpers, psi_step, n_psi):
    _, plan = _plan(particles3, helpers.tiny_config(psi_step_deg=psi_step))
    assert len(plan.psi_rad) == n_psi


def test_auto_psi_step_gets_finer_with_resolution(particles3, helpers):
    eng = Engine(particles3, helpers.tiny_config())
    coarse = len(eng.plan(0, True).psi_rad)
    eng.state.r_res = eng.state.r_res_sums = 1e3
    assert len(eng.plan(0, True).psi_rad) > coarse


@pytest.mark.parametrize("rng,step,n_shifts", [(4.0, 1.0, 49), (4.0, 2.0, 13), (0.0, None, 1), (2.0, 1.0, 13)])
def test_shift_range_and_step_set_the_shift_grid(particles3, helpers, rng, step, n_shifts):
    _, plan = _plan(particles3, helpers.tiny_config(shift_range_px=rng, shift_step_px=step))
    assert len(plan.shifts_px) == n_shifts
    assert float(plan.shifts_px.norm(dim=1).max()) <= rng + 1e-6


def test_auto_shift_step_gets_finer_with_resolution(particles3, helpers):
    """Default step box / (4 · E-step radius), at least one working px; --shift-step overrides it."""
    eng = Engine(particles3, helpers.tiny_config(shift_range_px=3.0))
    eng.state.r_res = eng.state.r_res_sums = 1.0  # E-step radius 5.25 on 32 px: step 32 / 21 = 1.52 px
    low = eng.plan(0, True)
    assert low.shift_step == pytest.approx(32 / (4 * low.r_cur)) and low.shift_step > 1.4
    assert len(low.shifts_px) == 9  # (0, 0), (±1.52, 0), (0, ±1.52), (±1.52, ±1.52) within 3 px
    eng.state.r_res = eng.state.r_res_sums = 1e3
    high = eng.plan(0, True)
    assert high.shift_step == 1.0 and len(high.shifts_px) == 29
    fixed = Engine(particles3, helpers.tiny_config(shift_range_px=3.0, shift_step_px=1.0))
    fixed.state.r_res = fixed.state.r_res_sums = 1.0
    assert len(fixed.plan(0, True).shifts_px) == 29


def test_default_shift_range_is_ten_percent_of_the_box(particles3, helpers):
    _, plan = _plan(particles3, helpers.tiny_config())
    assert 3.0 < float(plan.shifts_px.norm(dim=1).max()) <= 3.2  # 3.2 px on a 1 px grid
    assert len(plan.shifts_px) == 37


def test_search_grid_reaches_the_log(particles3, helpers):
    result = _run(particles3, helpers, psi_step_deg=15.0, shift_range_px=2.0, n_online_iterations=1)
    assert {h["psi_step_deg"] for h in result.history} == {15.0}
    assert {h["n_shifts"] for h in result.history} == {13}


# ------------------------------------------------------------ schedule
@pytest.mark.parametrize("online,bpc,full", [(2, 20, 1), (3, 30, 2), (1, 10, 0)])
def test_iterations_and_batch_sizes(particles3, helpers, online, bpc, full):
    result = _run(particles3, helpers, n_online_iterations=online, batch_size_per_class=bpc, n_full_iterations=full)
    h = result.history
    assert len(h) == online + max(full, 1)
    assert [r["particles"] for r in h[:online]] == [3 * bpc] * online
    assert [r["particles"] for r in h[online:]] == [300] * max(full, 1)
    assert [r["phase"] for r in h] == ["online"] * online + ["full"] * max(full, 1)
    assert [r["iteration"] for r in h] == list(range(1, len(h) + 1))


def test_empty_classes_are_reseeded(particles3, helpers):
    """Six classes for three distinct views: classes go empty and are split from the largest."""
    result = _run(particles3, helpers, n_classes=6, n_online_iterations=6, batch_size_per_class=20)
    assert sum(h["reseeded"] for h in result.history) > 0
    assert (result.counts > 0).sum() >= 3


def test_no_class_ends_empty_when_the_data_allow(sim3, particles3, helpers):
    """Three classes for three views: none ends empty, each view has its class."""
    result = _run(particles3, helpers, n_online_iterations=6, batch_size_per_class=30)
    assert (result.counts > 0).all()
    table = pd.crosstab(sim3.truth["view"].to_numpy(), result.class_index)
    assert (table.to_numpy().max(axis=1) >= 95).all()


# ------------------------------------------------------------ job-level options
def _star_with_duplicate(sim3, folder):
    blocks = starfile.read(sim3.star, always_dict=True)
    parts = blocks["particles"]
    parts = pd.concat([parts, parts.iloc[[5]]], ignore_index=True)
    stack = sim3.folder / "particles.mrcs"
    parts["rlnImageName"] = [f"{name.split('@')[0]}@{stack}" for name in parts["rlnImageName"]]
    path = folder / "dup.star"
    starfile.write({"optics": blocks["optics"], "particles": parts}, path)
    return path, len(parts)


def test_remove_duplicates(sim3, helpers, tmp_path):
    star, n = _star_with_duplicate(sim3, tmp_path)
    res = classify(star, tmp_path / "rm", helpers.tiny_config(n_online_iterations=1))
    kept = starfile.read(tmp_path / "rm" / "particles.star", always_dict=True)["particles"]
    dups = starfile.read(tmp_path / "rm" / "duplicates.star", always_dict=True)["particles"]
    assert res.n_duplicates == 1 and len(kept) == n - 1 and len(dups) == 1
    assert dups["rlnImageName"].iloc[0] == kept["rlnImageName"].iloc[5] or dups["rlnImageName"].iloc[0].startswith("000006@")
    assert res.counts.sum() == n - 1

    res = classify(star, tmp_path / "keep", helpers.tiny_config(n_online_iterations=1, remove_duplicates=False))
    assert res.n_duplicates == 0
    assert len(starfile.read(tmp_path / "keep" / "particles.star", always_dict=True)["particles"]) == n
    assert not (tmp_path / "keep" / "duplicates.star").exists()
    # Run again into the first job's folder without removal: its duplicates.star goes with the
    # run that wrote it (the particle is in particles.star now, and in no other list).
    classify(star, tmp_path / "rm", helpers.tiny_config(n_online_iterations=1, remove_duplicates=False))
    assert len(starfile.read(tmp_path / "rm" / "particles.star", always_dict=True)["particles"]) == n
    assert not (tmp_path / "rm" / "duplicates.star").exists()

    # Picks are 64 micrograph px (730 Å) apart: a 1000 Å separation merges neighbours.
    res = classify(star, tmp_path / "far", helpers.tiny_config(n_online_iterations=1, min_separation_angst=1000.0))
    assert res.n_duplicates > 10


def test_classes_are_sorted_by_the_counts_written_after_duplicates(particles3, helpers, monkeypatch):
    """Largest class first by the counts written: with duplicates left out, not the engine's counts
    (the largest class losing most of its particles as duplicate picks was written first)."""
    import cryo2d.classify as classify_mod

    config = helpers.tiny_config(n_online_iterations=2)
    result = _run(particles3, helpers, n_online_iterations=2)
    n, K = len(result.class_index), len(result.classes)
    big = int(np.argmax(np.bincount(result.class_index, minlength=K)))
    members = np.flatnonzero(result.class_index == big)
    keep = np.ones(n, dtype=bool)
    keep[members[1:]] = False  # all but one of the largest class are duplicate picks
    monkeypatch.setattr(classify_mod, "pick_locations", lambda particles: (np.zeros(n), np.zeros((n, 2))))
    monkeypatch.setattr(classify_mod, "duplicate_mask", lambda *args: keep)
    final = finalize(result, particles3, config)
    assert list(final.counts) == sorted(final.counts, reverse=True) and final.counts[-1] == 1
    np.testing.assert_array_equal(np.bincount(final.assignments.class_index[keep], minlength=K), final.counts)
    np.testing.assert_array_equal(final.classes[-1], result.classes[big])  # the former largest, now last


def test_no_sort_keeps_engine_order(particles3, helpers, tmp_path):
    kw = dict(n_classes=4, n_online_iterations=2)
    engine_counts = _run(particles3, helpers, **kw).counts
    classify(particles3, tmp_path / "sorted", helpers.tiny_config(**kw))
    classify(particles3, tmp_path / "unsorted", helpers.tiny_config(sort_classes=False, **kw))
    sorted_counts = starfile.read(tmp_path / "sorted" / "classes.star")["rlnClassParticleCount"].to_numpy()
    unsorted_counts = starfile.read(tmp_path / "unsorted" / "classes.star")["rlnClassParticleCount"].to_numpy()
    assert list(sorted_counts) == sorted(sorted_counts, reverse=True)
    np.testing.assert_array_equal(unsorted_counts, engine_counts)
    np.testing.assert_array_equal(np.sort(unsorted_counts), np.sort(sorted_counts))
    assert not np.array_equal(sorted_counts, unsorted_counts) or list(engine_counts) == sorted(engine_counts, reverse=True)
    with mrcfile.open(tmp_path / "sorted" / "classes.mrcs") as a, mrcfile.open(tmp_path / "unsorted" / "classes.mrcs") as b:
        order = np.argsort(-engine_counts, kind="stable")
        np.testing.assert_array_equal(a.data, b.data[order])


def test_seed(particles3, helpers, tmp_path):
    kw = dict(n_online_iterations=2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        classify(particles3, tmp_path / name, helpers.tiny_config(seed=seed, **kw))
    data = lambda n: mrcfile.read(tmp_path / n / "classes.mrcs").tobytes()  # noqa: E731
    labels = lambda n: starfile.read(tmp_path / n / "particles.star", always_dict=True)["particles"]["rlnClassNumber"].to_numpy()  # noqa: E731
    assert data("a") == data("b")
    np.testing.assert_array_equal(labels("a"), labels("b"))
    table = lambda n: starfile.read(tmp_path / n / "particles.star", always_dict=True)["particles"]  # noqa: E731
    pd.testing.assert_frame_equal(table("a"), table("b"))
    assert data("a") != data("c")


def test_same_seed_gives_identical_classes_mrcs_bytes(particles3, helpers, tmp_path):
    import time

    from cryo2d.io import write_stack

    classes = _run(particles3, helpers, n_online_iterations=1).classes
    write_stack(tmp_path / "a.mrcs", classes, 11.4)
    time.sleep(1.1)
    write_stack(tmp_path / "b.mrcs", classes, 11.4)
    assert (tmp_path / "a.mrcs").read_bytes() == (tmp_path / "b.mrcs").read_bytes()


# ------------------------------------------------------------ empty boxes
@pytest.fixture(scope="module")
def with_empty_boxes(bundled_volume, helpers):
    """480 particles, 32 px, SNR 0.5, three views, 25 % junk of which a third (40) are empty boxes."""
    from cryo2d.simulate import simulate

    sim = simulate(*bundled_volume, n_particles=480, box=32, snr=0.5, junk_fraction=0.25,
                   views="discrete", n_views=3, rare_view_fraction=1 / 3, seed=2)
    return sim, helpers.memory_particles(sim.images, sim.pixel_size_angst, ctf=sim.ctf)


@pytest.mark.parametrize("on", [True, False])
def test_empty_class_collects_the_empty_boxes(with_empty_boxes, on):
    """On: one class holds ≥ 90 % of the pure-noise images and is mostly junk; off: no class flagged, other result."""
    sim, particles = with_empty_boxes
    result = run_em(particles, EMConfig(n_classes=6, n_online_iterations=8, batch_size_per_class=40, seed=0, empty_class=on))
    kind = sim.truth["kind"].to_numpy()
    noise = kind == "noise"
    if on:
        k = result.empty_class
        assert k >= 0 and (result.class_index[noise] == k).mean() >= 0.9
        assert (kind[result.class_index == k] != "particle").mean() > 0.5
        # its average is the mean of its members (noise and faint ice): weak next to the particle classes
        assert result.classes[k].std() < 0.5 * np.median([result.classes[c].std() for c in range(6) if c != k])
    else:  # no class is flagged (the boxes may still gather in a class of their own: the auto mask helps them)
        assert result.empty_class == -1
        with_class = run_em(particles, EMConfig(n_classes=6, n_online_iterations=8, batch_size_per_class=40, seed=0))
        assert with_class.empty_class >= 0 and not np.array_equal(with_class.class_index, result.class_index)


def test_empty_class_keeps_only_half_posterior_members_in_force_max_runs(bundled_volume, helpers):
    """Force max with 128 particles a class or more (every pass hard): the last pass still keeps a
    particle in the empty-box class only where that class holds half its posterior or more."""
    from cryo2d.em.estep import NULL_MAJORITY
    from cryo2d.simulate import simulate

    sim = simulate(*bundled_volume, n_particles=900, box=32, snr=0.1, junk_fraction=0.3,
                   views="discrete", n_views=3, rare_view_fraction=1 / 3, seed=3)
    particles = helpers.memory_particles(sim.images, sim.pixel_size_angst, ctf=sim.ctf)
    config = EMConfig(n_classes=6, n_online_iterations=8, batch_size_per_class=40, seed=0, force_max=True)
    assert len(particles) >= 128 * config.n_classes  # engine.MAX_POSE_BELOW: the hard passes
    result = run_em(particles, config)
    members = result.class_index == result.empty_class
    assert result.empty_class >= 0 and members.sum() > 50  # 121 (223 before the rule reached these runs, 102 of them weak)
    assert result.class_posterior[members].min() >= NULL_MAJORITY


def test_blank_boxes_leave_the_noise_model_as_the_particles_give_it(bundled_volume, helpers, tmp_path):
    """Half the boxes blank (zero-filled): the noise model is the particles' (it fell to its floor,
    every shell 1e-4 of the mean, and the particles' classes with it)."""
    import torch

    from cryo2d.simulate import simulate

    sim = simulate(*bundled_volume, n_particles=300, box=32, snr=0.5, junk_fraction=0.0,
                   views="discrete", n_views=3, rare_view_fraction=1 / 3, seed=4)
    images = np.concatenate([sim.images, np.zeros_like(sim.images)])
    ctf = sim.ctf.subset(np.concatenate([np.arange(300), np.arange(300)]))
    config = EMConfig(n_classes=4, n_online_iterations=4, batch_size_per_class=40, seed=0)
    sigma = {}
    for name, imgs, c in (("particles", sim.images, sim.ctf), ("with blanks", images, ctf)):
        run_em(helpers.memory_particles(imgs, sim.pixel_size_angst, ctf=c), config, checkpoint=tmp_path / f"{name}.pt")
        sigma[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)["state"]["sigma2_shell"].double().numpy()
    ratio = sigma["with blanks"][1:] / sigma["particles"][1:]
    assert 0.5 < np.median(ratio) < 2.0, ratio
