"""E-step: posteriors over (shift, class, rotation) with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from cryo2d.em.estep import deshift_phases, e_step
from cryo2d.em.geometry import disc_points
from cryo2d.em.rotation import psi_grid, rotate_classes
from cryo2d.fourier import fft2c, rotate_images, shift_images

BOX = 32


def _blobs(box: int = BOX) -> torch.Tensor:
    """An asymmetric real image: two Gaussian blobs off the centre."""
    k = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    img = torch.exp(-((xx - 4) ** 2 + (yy + 2) ** 2) / 6) + 0.6 * torch.exp(-((xx + 3) ** 2 + (yy - 5) ** 2) / 10)
    return img.float()


def _problem(n_particles=6, n_classes=3, seed=0, noise=1.0):
    """Random references and noisy particles made from them; returns the e_step arguments."""
    g = torch.Generator().manual_seed(seed)
    pts = disc_points(BOX, 1, 10, half=True)
    m = len(pts)
    psi = psi_grid(30.0)
    shifts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    A = fft2c(torch.randn(n_classes, BOX, BOX, generator=g)) / BOX  # about unit power per point
    refs = rotate_classes(A, pts.xy, psi, 2)
    k_true = torch.arange(n_particles) % n_classes
    X = refs[k_true, 0] + noise * torch.complex(torch.randn(n_particles, m, generator=g), torch.randn(n_particles, m, generator=g))
    return dict(
        X=X,
        ctf=torch.ones(n_particles, m),
        inv_sigma2=pts.weight / (2 * noise**2),
        refs=refs,
        phases=deshift_phases(pts.xy / BOX, shifts),
        log_prior=torch.full((n_classes,), -math.log(n_classes)),
        scale=torch.ones(n_particles),
    )


def _weight_sums(res, n):
    return torch.zeros(n, dtype=res.entry_w.dtype).index_add_(0, res.entry_i, res.entry_w)


@pytest.mark.parametrize("mode", ["soft", "max_pose", "hard", "hard_class"])
def test_posteriors_sum_to_one(mode):
    args = _problem(noise=8.0)
    res = e_step(**args, mode=mode)
    n = args["X"].shape[0]
    torch.testing.assert_close(res.class_post.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(_weight_sums(res, n), torch.ones(n), atol=1e-5, rtol=0)
    assert ((res.max_prob > 0) & (res.max_prob <= 1 + 1e-6)).all()


def test_hard_gives_one_entry_of_weight_one():
    args = _problem(noise=8.0)
    n = args["X"].shape[0]
    res = e_step(**args, mode="hard")
    assert torch.equal(res.entry_i, torch.arange(n))
    assert torch.equal(res.entry_w, torch.ones(n))
    assert torch.equal(res.entry_k, res.best_k) and torch.equal(res.entry_r, res.best_r)


def test_soft_gives_fractional_weights():
    args = _problem(noise=8.0)
    n = args["X"].shape[0]
    res = e_step(**args, mode="soft")
    assert len(res.entry_w) > n  # several poses per particle
    assert ((res.entry_w > 0) & (res.entry_w < 1)).any()
    torch.testing.assert_close(_weight_sums(res, n), torch.ones(n), atol=1e-5, rtol=0)


def test_hard_class_keeps_one_class_per_particle():
    args = _problem(noise=8.0)
    res = e_step(**args, mode="hard_class")
    for i in range(args["X"].shape[0]):  # one class, and the written pose in it
        assert set(res.entry_k[res.entry_i == i].tolist()) == {int(res.best_k[i])}
    assert torch.equal(res.best_k, res.class_post.argmax(dim=1))


def test_max_pose_takes_each_probable_class_at_its_best_pose_by_hand():
    """max_pose (force max over poses): one entry per class, at the class's most probable
    (shift, rotation), weighted by the class's posterior summed over all its poses; classes under
    min_weight x the best class's posterior are dropped and the rest renormalised."""
    import numpy as np

    from cryo2d.em.estep import _Grid, _summarise

    T, K, R = 2, 3, 2  # flat pose index t·K·R + k·R + r
    lp = np.full((2, T, K, R), -1e3)
    lp[0, :, 0] = [[0.0, -1.0], [-2.0, -3.0]]  # class 0: best (t 0, r 0)
    lp[0, :, 1] = [[-5.0, -0.5], [-4.0, -6.0]]  # class 1: best (t 0, r 1)
    lp[0, :, 2] = -30.0  # class 2: far under min_weight
    lp[1, :, 0] = [[-3.0, -2.5], [-1.0, -2.0]]  # class 0: best (t 1, r 0)
    lp[1, :, 2] = [[-2.0, -2.0], [-1.5, 0.0]]  # class 2: best (t 1, r 1); class 1 negligible
    table = _Grid(torch.zeros(2, T, K * R), torch.zeros(2, K * R), K, R)
    res = _summarise(torch.from_numpy(lp.reshape(2, -1)).float(), table, "max_pose", 48, 5e-3)
    mass = np.exp(lp).sum(axis=(1, 3))  # (particle, class)
    post = mass / mass.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(res.class_post.numpy(), post, rtol=1e-5, atol=1e-7)
    got = {(int(i), int(k)): (int(t), int(r), float(w))
           for i, t, k, r, w in zip(res.entry_i, res.entry_t, res.entry_k, res.entry_r, res.entry_w)}
    kept0, kept1 = post[0, 0] + post[0, 1], post[1, 0] + post[1, 2]
    want = {(0, 0): (0, 0, post[0, 0] / kept0), (0, 1): (0, 1, post[0, 1] / kept0),
            (1, 0): (1, 0, post[1, 0] / kept1), (1, 2): (1, 1, post[1, 2] / kept1)}
    assert got.keys() == want.keys()
    for key, (t, r, w) in want.items():
        assert got[key][:2] == (t, r), key
        assert got[key][2] == pytest.approx(w, rel=1e-5), key
    assert res.best_k.tolist() == [0, 2] and res.best_t.tolist() == [0, 1] and res.best_r.tolist() == [0, 1]


def test_huge_log_likelihoods_do_not_underflow():
    """Log-likelihoods of ~1e9: every particle still has finite weights summing to 1 (log-sum-exp)."""
    args = _problem(noise=1.0)
    args["X"] = args["X"] * 1e4
    args["inv_sigma2"] = args["inv_sigma2"] * 1e3
    n = args["X"].shape[0]
    for mode in ("soft", "max_pose", "hard", "hard_class"):
        res = e_step(**args, mode=mode, temperature=1.0)
        for t in (res.class_post, res.max_prob, res.entry_w, res.log_evidence):
            assert torch.isfinite(t).all(), mode
        torch.testing.assert_close(res.class_post.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
        torch.testing.assert_close(_weight_sums(res, n), torch.ones(n), atol=1e-5, rtol=0)


def test_class_posteriors_are_the_float64_softmax_over_a_wide_range():
    """Log-probabilities spread over thousands of nats (and -inf padding): the class posteriors are
    the exact softmax; weights of poses more than 87 nats below the best are exactly 0."""
    from cryo2d.em.estep import _Grid, _summarise

    g = torch.Generator().manual_seed(3)
    b, T, K, R = 5, 4, 3, 6
    logp = -3000.0 * torch.rand(b, T * K * R, generator=g, dtype=torch.float64)
    logp[:, :20] = -60.0 * torch.rand(b, 20, generator=g, dtype=torch.float64)  # a band of significant poses
    logp[:, 30:40] = float("-inf")
    grid = _Grid(torch.zeros(b, T, K * R), torch.zeros(b, K * R), K, R)
    res = _summarise(logp.float().clone(), grid, "soft", 10_000, 0.0)
    want = torch.softmax(logp.float().double(), dim=1).view(b, T, K, R).sum(dim=(1, 3))
    torch.testing.assert_close(res.class_post.double(), want, atol=1e-7, rtol=0)
    below = logp.float() - logp.float().amax(dim=1, keepdim=True)
    kept = torch.zeros(b, T * K * R, dtype=torch.bool)
    kept[res.entry_i, res.entry_t * K * R + res.entry_k * R + res.entry_r] = res.entry_w > 0
    assert not kept[below < -87.0].any() and kept[below > -86.0].all()
    assert (below < -87.0).sum() > 100  # the floor was exercised


def test_true_class_wins_at_low_noise():
    args = _problem(noise=0.01)
    res = e_step(**args, mode="soft")
    n, K = args["X"].shape[0], args["refs"].shape[0]
    assert torch.equal(res.best_k, torch.arange(n) % K)
    assert torch.equal(res.best_r, torch.zeros(n, dtype=torch.long))
    assert (res.max_prob > 0.99).all()


@pytest.mark.parametrize("psi_deg,shift", [(90.0, (2.0, -1.0)), (60.0, (-3.0, 0.0)), (210.0, (1.0, 2.0))])
def test_best_pose_is_the_true_pose(psi_deg, shift):
    """A noiseless particle = the reference rotated by ψ (real space) then shifted by t."""
    img = _blobs()
    particle = shift_images(rotate_images(img[None], torch.tensor([psi_deg])), torch.tensor([shift]))
    pts = disc_points(BOX, 1, 10, half=True)
    psi = psi_grid(30.0)
    k = torch.arange(-3, 4, dtype=torch.float32)
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    shifts = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    refs = rotate_classes(fft2c(img[None]), pts.xy, psi, 2)
    X = fft2c(particle).flatten(1)[:, pts.flat]
    sigma2 = 1e-3
    res = e_step(X, torch.ones_like(X.real), pts.weight / sigma2, refs, deshift_phases(pts.xy / BOX, shifts),
                 torch.zeros(1), torch.ones(1), mode="soft")
    assert math.degrees(float(psi[res.best_r])) == pytest.approx(psi_deg, abs=1e-3)
    assert shifts[res.best_t[0]].tolist() == list(shift)
    assert float(res.max_prob[0]) > 0.99


def test_temperature_flattens_posteriors():
    args = _problem(noise=4.0)
    cold = e_step(**args, mode="soft", temperature=1.0)
    hot = e_step(**args, mode="soft", temperature=50.0)
    assert float(hot.max_prob.mean()) < float(cold.max_prob.mean())


def test_deshift_phases_undo_a_shift():
    img = _blobs()
    t = torch.tensor([[3.0, -2.0]])
    pts = disc_points(BOX, 0, 15, half=False)
    X = fft2c(shift_images(img[None], t)).flatten(1)[:, pts.flat]
    back = X * deshift_phases(pts.xy / BOX, t)
    torch.testing.assert_close(back, fft2c(img[None]).flatten(1)[:, pts.flat], atol=1e-3, rtol=1e-4)


def _shift_disc(radius: int) -> torch.Tensor:
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    keep = xx**2 + yy**2 <= radius**2
    return torch.stack([xx[keep], yy[keep]], dim=1)


def _smooth_classes(k: int, g: torch.Generator) -> torch.Tensor:
    """(k, BOX, BOX) centred transforms of Gaussian-filtered (σ = 2 px) random images."""
    f = torch.fft.fftfreq(BOX)
    lowpass = torch.exp(-(f[:, None] ** 2 + f[None, :] ** 2) * (2 * math.pi * 2.0) ** 2 / 2)
    return fft2c(torch.fft.ifft2(torch.fft.fft2(torch.randn(k, BOX, BOX, generator=g)) * lowpass).real)


def _search_problem(n_classes: int, seed: int, psi_deg: float = 10.0):
    """Smooth classes on a ``psi_deg`` / 1 px grid of radius 3 px: (generator, points, psi, shifts, refs, phases)."""
    g = torch.Generator().manual_seed(seed)
    pts = disc_points(BOX, 1, 12, half=True)
    psi, shifts = psi_grid(psi_deg), _shift_disc(3)
    refs = rotate_classes(_smooth_classes(n_classes, g), pts.xy, psi, 2)
    return g, pts, psi, shifts, refs, deshift_phases(pts.xy / BOX, shifts)


@pytest.mark.parametrize("psi_deg", [10.0, 8.0])
def test_coarse_to_fine_finds_the_exhaustive_best_pose(psi_deg):
    """Low noise, 10° rotations (or 45 of 8°: an odd number, the last coarse rotation one fine
    step from the first), 1 px shifts: both searches agree; precomputed references change nothing.

    A bfloat16 coarse stage (ranking only) finds the same poses with the same
    float32 scores.
    """
    from cryo2d.em.estep import coarse_references, coarse_subgrid, e_step_coarse_to_fine

    g, pts, psi, shifts, refs, phases = _search_problem(3, seed=3, psi_deg=psi_deg)
    n = 12
    k_true, r_true, t_true = torch.arange(n) % 3, (torch.arange(n) * 7) % len(psi), (torch.arange(n) * 5) % len(shifts)
    # particle = reference shifted by the shift that the de-shift phases undo
    X = refs[k_true, r_true] / phases[t_true]
    X = X + 0.05 * X.abs().mean() * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    args = (X, torch.ones(n, len(pts)), pts.weight, refs, phases, torch.zeros(3), torch.ones(n))
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 12.0)
    exh = e_step(*args, mode="hard")
    c2f = e_step_coarse_to_fine(*args, grid, mode="hard")
    assert torch.equal(exh.best_k, k_true) and torch.equal(exh.best_r, r_true) and torch.equal(exh.best_t, t_true)
    assert torch.equal(c2f.best_k, k_true) and torch.equal(c2f.best_r, r_true) and torch.equal(c2f.best_t, t_true)
    power = refs.abs().square()
    pre = e_step_coarse_to_fine(*args, grid, mode="hard", refs_power=power, coarse_refs=coarse_references(refs, grid, power))
    torch.testing.assert_close(pre.best_cross, c2f.best_cross)
    bf = e_step_coarse_to_fine(*args, grid, mode="hard", coarse_refs=coarse_references(refs, grid, power, torch.bfloat16))
    assert torch.equal(bf.best_k, k_true) and torch.equal(bf.best_r, r_true) and torch.equal(bf.best_t, t_true)
    torch.testing.assert_close(bf.best_cross, c2f.best_cross)
    torch.testing.assert_close(e_step(*args, mode="hard", refs_power=power).best_cross, exh.best_cross)
    if psi_deg == 10.0:  # 36 rotations in half-turn pairs: the first half's power stands for all
        half = power[:, : len(psi) // 2]
        for out, full in ((e_step_coarse_to_fine(*args, grid, mode="hard", refs_power=half,
                                                 coarse_refs=coarse_references(refs, grid, half)), c2f),
                          (e_step(*args, mode="hard", refs_power=half), exh)):
            assert torch.equal(out.best_k, k_true) and torch.equal(out.best_r, r_true)
            torch.testing.assert_close(out.best_norm, full.best_norm)
            torch.testing.assert_close(out.class_post, full.class_post)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_coarse_stage_on_half_turn_pairs_scores_like_the_full_product(mode, monkeypatch):
    """Float32 coarse references in half-turn pairs (real and imaginary parts of half the
    rotations, two real products) give the full product's coarse scores: the same best poses,
    posteriors and M-step entries (with the kernels and in torch), the same coarse maxima and
    their shifts."""
    from cryo2d.em import kernels
    from cryo2d.em.estep import coarse_references, coarse_subgrid, e_step_coarse_to_fine, paired_coarse_ok

    g, pts, psi, shifts, refs, phases = _search_problem(4, seed=7)  # 36 rotations: 18 coarse, in 9 pairs
    n = 16
    X = refs[torch.arange(n) % 4, (torch.arange(n) * 5) % len(psi)] / phases[(torch.arange(n) * 3) % len(shifts)]
    sd = 0.3 * float(X.abs().mean())
    X = X + sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    args = (X, torch.ones(n, len(pts)), pts.weight / (2 * sd**2), refs, phases, torch.full((4,), -math.log(4)), torch.ones(n))
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 8.0)
    power = refs.abs().square()
    assert paired_coarse_ok(psi, grid, torch.float32) == kernels.available("cpu")
    assert not paired_coarse_ok(psi, grid, torch.bfloat16)
    assert not paired_coarse_ok(psi_grid(8.0), coarse_subgrid(shifts, 1.0, 45, pts.xy.norm(dim=1), 8.0), torch.float32)
    # 90 rotations: coarse rotations 0, 2, …, 88, whose half turns (45, 47, …) are not among them
    assert not paired_coarse_ok(psi_grid(4.0), coarse_subgrid(shifts, 1.0, 90, pts.xy.norm(dim=1), 8.0), torch.float32)
    with pytest.raises(ValueError, match="half-turn pairs"):
        coarse_references(refs, grid, power, torch.bfloat16, pairs=True)
    Zp, power_p = coarse_references(refs, grid, power, pairs=True)
    Zc, power_c = coarse_references(refs, grid, power)
    Rc, Mc = len(grid.coarse_r), len(grid.coarse_m)
    assert Zp.shape == (2, 4 * Rc // 2, Mc) and torch.equal(power_p, power_c)
    full = e_step_coarse_to_fine(*args, grid, mode=mode, refs_power=power, coarse_refs=(Zc, power_c))
    paired = e_step_coarse_to_fine(*args, grid, mode=mode, refs_power=power, coarse_refs=(Zp, power_p))
    with monkeypatch.context() as m:  # the torch code (a GPU's) on the same pairs
        m.setattr(kernels, "available", lambda device: False)
        paired_torch = e_step_coarse_to_fine(*args, grid, mode=mode, refs_power=power, coarse_refs=(Zp, power_p))
    for out in (paired, paired_torch):
        for name in ("best_k", "best_r", "best_t", "entry_i", "entry_t", "entry_k", "entry_r"):
            assert torch.equal(getattr(out, name), getattr(full, name)), name
        for name in ("best_cross", "class_post", "entry_w", "log_evidence"):
            torch.testing.assert_close(getattr(out, name), getattr(full, name), msg=name)
    # The maxima: the kernel against torch on the full product's scores of these particles.
    Pc = (X * args[2])[:, grid.coarse_m]
    Ec = phases[grid.coarse_t][:, grid.coarse_m]
    Y = torch.view_as_real(Pc.unsqueeze(1) * Ec.unsqueeze(0))  # (n, Tc, Mc, 2)
    scores = (Y.reshape(-1, 2 * Mc) @ Zc.T).view(n, len(grid.coarse_t), -1)
    re = (Y[..., 0] @ Zp[0].T).view(n, len(grid.coarse_t), 4, Rc // 2)
    im = (Y[..., 1] @ Zp[1].T).view(n, len(grid.coarse_t), 4, Rc // 2)
    if kernels.available("cpu"):
        split = kernels.coarse_images_split(Pc, Ec)  # real parts, then imaginary parts, of each row
        torch.testing.assert_close(split, Y.transpose(2, 3).reshape(-1, 2 * Mc), rtol=1e-6, atol=1e-6 * float(Y.abs().max()))
        best, at = kernels.coarse_max_pairs(re, im)
        top = float(scores.abs().max())  # float32 sums in another order: equal to their rounding
        torch.testing.assert_close(best, scores.amax(dim=1), rtol=0, atol=1e-5 * top)
        close = (scores.gather(1, at.unsqueeze(1)).squeeze(1) - scores.amax(dim=1)).abs() <= 1e-5 * top
        assert bool(close.all())  # each column's chosen row is a best row
        # the kernel gives torch's sums exactly: re ± im, rotation r then r + Rc/2 within each class
        both = torch.cat([re + im, re - im], dim=3).view(n, len(grid.coarse_t), -1)
        assert torch.equal(best, both.amax(dim=1)) and torch.equal(at, both.argmax(dim=1))


@pytest.mark.parametrize("pairs", [False, True])
def test_int8_coarse_stage_finds_the_float32_poses(pairs):
    """The int8 coarse stage (balanced, quantised references and images, exact int32 products) ranks
    as float32 does: the true poses with the float32 scores at low noise (the fine stage is float32),
    the same poses and posteriors at moderate noise; its coarse maxima are float32's to 0.5 % of their
    spread; where the references' power falls steeply with frequency and the images' noise with it
    (real classes and data), the balance of the points keeps the error well below plain per-row
    quantisation's; the references dequantise to within half a step."""
    from cryo2d.em import kernels
    from cryo2d.em.estep import QuantizedRefs, coarse_maxima, coarse_references, coarse_subgrid, e_step_coarse_to_fine

    if not kernels.available("cpu"):
        pytest.skip("Numba not installed")
    g, pts, psi, shifts, refs, phases = _search_problem(4, seed=7)  # 36 rotations: 18 coarse, in 9 pairs
    n = 64
    k_true, r_true, t_true = torch.arange(n) % 4, (torch.arange(n) * 5) % len(psi), (torch.arange(n) * 3) % len(shifts)
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 8.0)
    cm, Mc = grid.coarse_m, len(grid.coarse_m)
    radius = pts.xy.norm(dim=1)
    for noise, falloff in ((0.05, None), (0.3, None), (0.5, 0.3 * 8.0)):
        env = torch.ones_like(radius) if falloff is None else torch.exp(-((radius / falloff) ** 2))
        r = refs * env  # with a fall-off, the noise SD falls as the signal does
        power = r.abs().square()
        clean = r[k_true, r_true] / phases[t_true]
        sd = noise * float(clean.abs().mean()) * env
        X = clean + sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
        inv = pts.weight / (2 * sd**2)
        args = (X, torch.ones(n, len(pts)), inv, r, phases, torch.full((4,), -math.log(4)), torch.ones(n))
        image_power = inv * pts.weight  # E|X·c·w/σ²|², as Engine._image_power gives it
        Zf, power_f = coarse_references(r, grid, power, pairs=pairs)
        Zq, power_q = coarse_references(r, grid, power, torch.int8, pairs=pairs, image_power=image_power)
        assert isinstance(Zq, QuantizedRefs) and Zq.q.dtype == torch.int8 and torch.equal(power_q, power_f)
        assert Zq.q.shape == ((2, 4 * 9, Mc) if pairs else (4 * 18, 2 * Mc))
        assert int(Zq.q.abs().max()) == 63  # the rows use their whole range (7 bits: REF_LEVELS)
        # dequantised references: within half a step of their (balanced) values
        Z = r[:, grid.coarse_r[:9] if pairs else grid.coarse_r][:, :, cm].reshape(-1, Mc) / Zq.balance
        q = torch.cat([Zq.q[0], Zq.q[1]], dim=1) if pairs else Zq.q
        back = torch.complex(q[:, :Mc].float(), q[:, Mc:].float()) * Zq.scale[:, None]
        err = torch.maximum((back - Z).real.abs(), (back - Z).imag.abs()).amax(dim=1)
        assert float((err / Zq.scale).max()) <= 0.5 + 1e-3
        # the coarse maxima
        Pc, Ec = (X * inv)[:, cm], phases[grid.coarse_t][:, cm]
        best_f, at_f, _ = coarse_maxima(Pc, Ec, Zf, 4)
        best_q, at_q, _ = coarse_maxima(Pc, Ec, Zq, 4)
        spread = float((best_f.amax(dim=1) - best_f.amin(dim=1)).median())
        assert float((best_q - best_f).std()) < 5e-3 * spread and float((best_q - best_f).abs().max()) < 2e-2 * spread
        if pairs:  # the kernels give each column's best shift: nearly always float32's
            assert float((at_q == at_f).float().mean()) > 0.95
        if falloff is not None:  # against plain quantisation, each row's own scale only (a_f = 1: image power = reference power)
            flat, _ = coarse_references(r, grid, power, torch.int8, pairs=pairs,
                                        image_power=power[:, grid.coarse_r].mean(dim=(0, 1)))
            assert torch.allclose(flat.balance, torch.ones(Mc), rtol=1e-4) and float(Zq.balance.std()) > 0.1
            best_flat, _, _ = coarse_maxima(Pc, Ec, flat, 4)
            assert float((best_q - best_f).std()) < 0.1 * float((best_flat - best_f).std())  # 0.01 here
            continue
        full = e_step_coarse_to_fine(*args, grid, mode="soft", refs_power=power, coarse_refs=(Zf, power_f))
        q8 = e_step_coarse_to_fine(*args, grid, mode="soft", refs_power=power, coarse_refs=(Zq, power_q))
        assert torch.equal(full.best_k, k_true) and torch.equal(full.best_r, r_true)
        for name in ("best_k", "best_r", "best_t"):
            assert torch.equal(getattr(q8, name), getattr(full, name)), name
        torch.testing.assert_close(q8.best_cross, full.best_cross)
        torch.testing.assert_close(q8.class_post, full.class_post, rtol=0, atol=1e-4)


def test_int8_coarse_images_and_maxima():
    """kernels.coarse_images8 quantises each particle's de-shifted, balanced rows with one scale
    (the largest |P·a| over 127) to the nearest integer, as torch rounds them (±1 where float rounding
    falls on a half); coarse_max_pairs finds the int32 maxima and their rows exactly."""
    from cryo2d.em import kernels

    if not kernels.available("cpu"):
        pytest.skip("Numba not installed")
    g = torch.Generator().manual_seed(4)
    b, Tc, Mc = 7, 5, 33
    P = torch.complex(torch.randn(b, Mc, generator=g), torch.randn(b, Mc, generator=g))
    P[3] = 0  # a particle with nothing: scale 0, rows 0
    phases = torch.polar(torch.ones(Tc, Mc), 2 * math.pi * torch.rand(Tc, Mc, generator=g))
    balance = torch.rand(Mc, generator=g) + 0.5
    rows, scale = kernels.coarse_images8(P, phases, balance)
    assert rows.dtype == torch.int8 and rows.shape == (b * Tc, 2 * Mc)
    top = (P.abs() * balance).amax(dim=1)
    torch.testing.assert_close(scale, top / 127)
    Y = (P * balance).unsqueeze(1) * phases.unsqueeze(0)  # (b, Tc, Mc)
    exact = torch.cat([Y.real, Y.imag], dim=2) * torch.where(top > 0, 127 / top, 0.0)[:, None, None]
    diff = (rows.view(b, Tc, 2 * Mc).float() - torch.round(exact)).abs()
    assert float(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    assert float((rows.view(b, Tc, 2 * Mc).float() - exact).abs().max()) <= 0.5 + 1e-4
    assert int(rows.view(b, Tc, -1)[3].abs().max()) == 0 and float(scale[3]) == 0.0
    # int32 maxima of re ± im over the rows, as torch's max (first of equal rows)
    re = torch.randint(-5000, 5000, (b, Tc, 3, 4), generator=g, dtype=torch.int32)
    im = torch.randint(-5000, 5000, (b, Tc, 3, 4), generator=g, dtype=torch.int32)
    re[0, 2] = re[0, 1]
    im[0, 2] = im[0, 1]  # a tie: the first row wins
    best, at = kernels.coarse_max_pairs(re, im)
    both = torch.cat([re + im, re - im], dim=3).view(b, Tc, -1)
    assert best.dtype == torch.int32 and torch.equal(best, both.amax(dim=1)) and torch.equal(at, both.argmax(dim=1))


def test_coarse_dtype_follows_the_cpu_flags(monkeypatch):
    """bfloat16 with AMX-BF16 or AVX512-BF16, int8 with AVX2 alone (and the kernels), else float32."""
    from cryo2d.em import estep, kernels

    for flags, want in ((["avx2", "amx_bf16"], torch.bfloat16), (["avx2", "avx512_bf16"], torch.bfloat16),
                        (["avx2", "avx512f"], torch.int8 if kernels.available("cpu") else torch.float32),
                        (["sse4_2"], torch.float32), ([], torch.float32)):
        monkeypatch.setattr(estep, "_cpu_flags", lambda flags=flags: flags)
        assert estep.coarse_dtype_for("cpu") == want, flags
    monkeypatch.setattr(kernels, "available", lambda device: False)
    monkeypatch.setattr(estep, "_cpu_flags", lambda: ["avx2"])
    assert estep.coarse_dtype_for("cpu") == torch.float32  # int8 needs the kernels


def test_coarse_to_fine_scores_each_candidate_pose_once():
    """Soft, noisy, one class (its best pose is also the top candidate): every kept pose is
    distinct, and the weight ratio of any two equals exp of their log-likelihood difference
    computed by hand in float64.
    """
    from cryo2d.em.estep import coarse_subgrid, e_step_coarse_to_fine

    g, pts, psi, shifts, refs, phases = _search_problem(1, seed=5)
    n = 6
    X = refs[0, (torch.arange(n) * 5) % len(psi)] / phases[(torch.arange(n) * 7) % len(shifts)]
    sd = 6.0 * float(X.abs().mean())
    X = X + sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    inv_sigma2 = pts.weight / (2 * sd**2)
    args = (X, torch.ones(n, len(pts)), inv_sigma2, refs, phases, torch.zeros(1), torch.ones(n))
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 12.0)
    res = e_step_coarse_to_fine(*args, grid, mode="soft", max_entries=200, min_weight=1e-6)
    c128 = torch.complex128
    for i in range(n):
        on = res.entry_i == i
        t, r, w = res.entry_t[on], res.entry_r[on], res.entry_w[on].double()
        assert len(t) > 9  # a spread posterior: many poses kept
        assert len(torch.unique(t * len(psi) + r)) == len(t)  # each pose once
        Y = X[i].to(c128) * phases[t].to(c128)  # (e, m) de-shifted at each entry's shift
        Z = refs[0, r].to(c128)
        lp = (Y * Z.conj() * inv_sigma2.double()).sum(dim=1).real - 0.5 * (Z.abs() ** 2 * inv_sigma2.double()).sum(dim=1)
        torch.testing.assert_close(torch.log(w) - torch.log(w[0]), lp - lp[0], atol=2e-3, rtol=0)


def test_close_candidates_are_those_one_coarse_rotation_apart_in_one_class():
    """Only candidates of one class one coarse rotation apart (cyclically) can share a fine pose;
    with fewer than 3 coarse rotations any two can."""
    from cryo2d.em.estep import _close_candidates

    k = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1], [2, 2, 0, 0], [0, 0, 1, 1]])
    r = torch.tensor([[0, 0, 2, 4], [0, 0, 5, 1], [3, 3, 1, 1], [0, 3, 2, 2]])
    assert _close_candidates(k, r, 6).tolist() == [False, True, False, False]
    assert _close_candidates(k, r, 2).all()


@pytest.mark.parametrize("psi_deg", [90.0, 10.0, 24.0])
def test_coarse_to_fine_each_pose_once_when_neighbourhoods_overlap(psi_deg):
    """4 rotations: two coarse rotations, whose ±1 fine neighbourhoods wrap onto each other; a
    10° grid whose coarse scores tie (a symmetric class); and 15 rotations, whose last coarse
    rotation is one fine step from the first: every kept pose is distinct and the weights are
    those of the exhaustive search over the same poses."""
    from cryo2d.em.estep import coarse_subgrid, e_step_coarse_to_fine

    g = torch.Generator().manual_seed(11)
    pts = disc_points(BOX, 1, 12, half=True)
    psi, shifts = psi_grid(psi_deg), _shift_disc(2)
    A = _smooth_classes(2, g)
    A[1] = A[1] + torch.rot90(A[1], 2, dims=(-2, -1))  # 180°-symmetric: tied rotations
    refs = rotate_classes(A, pts.xy, psi, 2)
    phases = deshift_phases(pts.xy / BOX, shifts)
    n = 5
    X = refs[torch.arange(n) % 2, 0]
    sd = 8.0 * float(X.abs().mean())
    X = X + sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    args = (X, torch.ones(n, len(pts)), pts.weight / (2 * sd**2), refs, phases, torch.zeros(2), torch.ones(n))
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 12.0)
    res = e_step_coarse_to_fine(*args, grid, mode="soft", max_entries=500, min_weight=1e-7)
    exh = e_step(*args, mode="soft", max_entries=500, min_weight=1e-7)
    KR = 2 * len(psi)
    for i in range(n):
        on = res.entry_i == i
        key = res.entry_t[on] * KR + res.entry_k[on] * len(psi) + res.entry_r[on]
        assert len(torch.unique(key)) == len(key)
        ex = exh.entry_i == i
        ex_key = exh.entry_t[ex] * KR + exh.entry_k[ex] * len(psi) + exh.entry_r[ex]
        ex_w = dict(zip(ex_key.tolist(), exh.entry_w[ex].tolist()))
        shared = [j for j, kk in enumerate(key.tolist()) if kk in ex_w]
        assert len(shared) >= 2
        w = res.entry_w[on][shared].double()
        w_ex = torch.tensor([ex_w[key[j].item()] for j in shared], dtype=torch.float64)
        torch.testing.assert_close(w / w.sum(), w_ex / w_ex.sum(), rtol=2e-3, atol=1e-6)


def _noisy_search(n_classes: int, seed: int, n: int, noise: float):
    """``n`` particles of classes 0, 1, …, K-1, 0, … at varied poses, complex noise of ``noise`` times
    their mean modulus: the E-step's positional arguments and the coarse grid."""
    from cryo2d.em.estep import coarse_subgrid

    g, pts, psi, shifts, refs, phases = _search_problem(n_classes, seed=seed)
    X = refs[torch.arange(n) % n_classes, (torch.arange(n) * 5) % len(psi)] / phases[(torch.arange(n) * 3) % len(shifts)]
    sd = noise * float(X.abs().mean())
    X = X + sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    args = (X, torch.ones(n, len(pts)), pts.weight / (2 * sd**2), refs, phases, torch.zeros(n_classes), torch.ones(n))
    return args, coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 12.0)


def test_fine_stage_chunk_groups_particles_without_changing_scores(monkeypatch):
    """The torch fine stage's particles per product (8 on a CPU without Numba, 256 on a GPU) change
    no score: 7 particles 1, 3, 8 or 256 at a time give the same soft posterior."""
    from cryo2d.em import kernels
    from cryo2d.em.estep import FINE_CHUNK, GPU_FINE_CHUNK, e_step_coarse_to_fine, fine_chunk_for

    monkeypatch.setattr(kernels, "available", lambda device: False)
    assert (fine_chunk_for("cpu"), fine_chunk_for("cuda:0")) == (FINE_CHUNK, GPU_FINE_CHUNK)
    n = 7
    args, grid = _noisy_search(3, seed=7, n=n, noise=6.0)
    runs = [e_step_coarse_to_fine(*args, grid, mode="soft", fine_chunk=c) for c in (1, 3, 8, GPU_FINE_CHUNK)]
    for other in runs[1:]:
        for name in ("entry_i", "entry_t", "entry_r"):
            assert torch.equal(getattr(other, name), getattr(runs[0], name))
        torch.testing.assert_close(other.entry_w, runs[0].entry_w)
        torch.testing.assert_close(other.class_post, runs[0].class_post)
    assert len(runs[0].entry_w) > 2 * n  # soft: more than one pose kept per particle


def _with_empty_class(args: dict) -> dict:
    """The problem's classes plus an empty-box class (index K, zero references)."""
    refs = args["refs"]
    K = refs.shape[0]
    return {**args, "refs": torch.cat([refs, torch.zeros_like(refs[:1])]), "log_prior": torch.full((K + 1,), -math.log(K + 1))}


def test_empty_box_class_has_the_evidence_of_noise_alone():
    """Class posterior of the empty-box class = (T·R) / (T·R + Σ_k,poses exp(gain)), by hand in float64."""
    args = _with_empty_class(_problem(n_particles=8, noise=2.0))
    n, m = args["X"].shape
    K1, R, _ = args["refs"].shape
    T = args["phases"].shape[0]
    g = torch.Generator().manual_seed(1)
    args["X"][4:] = 2.0 * torch.complex(torch.randn(4, m, generator=g), torch.randn(4, m, generator=g))  # 4 empty boxes
    res = e_step(**args, mode="soft", null_class=K1 - 1)
    c128 = torch.complex128
    P = args["X"].to(c128) * args["inv_sigma2"].double()
    Y = P[:, None, :] * args["phases"].to(c128)[None]  # (n, T, m)
    Z = args["refs"][: K1 - 1].to(c128).reshape(-1, m)  # (K·R, m)
    cross = torch.einsum("itm,jm->itj", Y, Z.conj()).real
    norm = (Z.abs() ** 2 * args["inv_sigma2"].double()).sum(dim=1)
    gain_sum = torch.exp(cross - 0.5 * norm).sum(dim=(1, 2))
    expected = T * R / (T * R + gain_sum)
    torch.testing.assert_close(res.class_post[:, K1 - 1].double(), expected, atol=1e-4, rtol=1e-3)
    null = res.class_post[:, K1 - 1]
    assert float(null[4:].min()) > float(null[:4].max()) and (null[:4] < 0.1).all()  # empty boxes look empty
    torch.testing.assert_close(res.class_post.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    # hard: the empty class wins exactly when the best pose's gain is below log(T·R)
    hard = e_step(**args, mode="hard", null_class=K1 - 1)
    best_gain = (cross - 0.5 * norm).amax(dim=(1, 2))
    assert torch.equal(hard.best_k == K1 - 1, best_gain < math.log(T * R))
    # one M-step entry (zero shift: row 0 here, rotation 0) per particle carries the empty class's weight
    on = res.entry_k == K1 - 1
    assert torch.equal(res.entry_i[on], torch.unique(res.entry_i[on]))
    assert (res.entry_t[on] == 0).all() and (res.entry_r[on] == 0).all()


def test_an_empty_box_is_one_the_empty_class_holds_half_of_or_more():
    """choose_class by hand; hard_class sums each particle at the class choose_class gives it."""
    from cryo2d.em.estep import choose_class

    post = torch.tensor([[0.35, 0.25, 0.40], [0.30, 0.10, 0.60], [0.20, 0.70, 0.10], [0.26, 0.26, 0.48]])
    assert choose_class(post, 2).tolist() == [0, 2, 1, 0]  # rows 0 and 3: the empty class leads but holds < 1/2
    assert choose_class(post, -1).tolist() == [2, 2, 1, 2]  # no empty class: the most probable
    assert choose_class(post, 0).tolist() == [2, 2, 1, 2]  # the empty class led nowhere

    # Four copies of one view share each particle's mass: weak particles have the empty
    # class ahead of each copy while the copies together hold more than it.
    args = _problem(n_particles=1, n_classes=1)
    refs, m = args["refs"], args["X"].shape[1]
    n = 96
    g = torch.Generator().manual_seed(3)
    amp = torch.linspace(0.3, 0.6, n)[:, None]
    X = amp * refs[0, 0] + torch.complex(torch.randn(n, m, generator=g), torch.randn(n, m, generator=g))
    args.update(X=X, ctf=torch.ones(n, m), scale=torch.ones(n), refs=torch.cat([refs] * 4 + [torch.zeros_like(refs)]),
                log_prior=torch.full((5,), -math.log(5)))
    post = e_step(**args, mode="soft", null_class=4).class_post
    leads = (post.argmax(dim=1) == 4) & (post[:, 4] < 0.5)
    assert int(leads.sum()) >= 2 and int((post[:, 4] >= 0.5).sum()) >= 10
    chosen = choose_class(post, 4)
    assert (chosen[leads] != 4).all() and (chosen[post[:, 4] >= 0.5] == 4).all()
    hard = e_step(**args, mode="hard_class", null_class=4)
    assert torch.equal(hard.entry_k, chosen[hard.entry_i])
    assert torch.equal(hard.best_k, chosen)  # the written pose: in that class, not the empty class's


def test_coarse_to_fine_empty_box_class_matches_the_exhaustive_search():
    """Same empty-box decisions from both searches; the empty class takes no candidate slot."""
    from cryo2d.em.estep import coarse_subgrid, e_step_coarse_to_fine

    g, pts, psi, shifts, refs, phases = _search_problem(3, seed=4)
    refs = torch.cat([refs, torch.zeros(1, len(psi), len(pts), dtype=torch.complex64)])
    n = 12
    k_true, r_true, t_true = torch.arange(n) % 3, (torch.arange(n) * 7) % len(psi), (torch.arange(n) * 5) % len(shifts)
    sd = 0.4 * float(refs[:3].abs().mean())
    X = sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    X[:6] = X[:6] + refs[k_true[:6], r_true[:6]] / phases[t_true[:6]]  # 6 particles, 6 empty boxes
    args = (X, torch.ones(n, len(pts)), pts.weight / (2 * sd**2), refs, phases, torch.zeros(4), torch.ones(n))
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 12.0)
    for mode in ("soft", "hard"):
        exh = e_step(*args, mode=mode, null_class=3)
        c2f = e_step_coarse_to_fine(*args, grid, mode=mode, null_class=3)
        assert torch.equal(exh.best_k, torch.cat([k_true[:6], torch.full((6,), 3)])), mode
        assert torch.equal(c2f.best_k, exh.best_k), mode
        for res in (exh, c2f):  # an empty box's pose: rotation 0 at zero shift, not a tie broken by grid order
            empty = res.best_k == 3
            assert (res.best_r[empty] == 0).all() and (shifts[res.best_t[empty]] == 0).all(), mode
    torch.testing.assert_close(c2f.class_post[:, 3], exh.class_post[:, 3], atol=0.05, rtol=0)


@pytest.mark.parametrize("search", ["exhaustive", "coarse_to_fine", "coarse_pairs", "coarse_int8"])
@pytest.mark.parametrize("mode", ["soft", "max_pose", "hard"])
def test_rotation_table_scores_like_the_dense_references(search, mode, monkeypatch):
    """References sampled from a RotationTable (a few classes at a time) give the dense references' E-step
    (``coarse_pairs``: the coarse references in half-turn pairs, from either; ``coarse_int8``: in int8 on
    pairs, the same integers from either).

    The table's rows are the dense rows, but the norms (and, exhaustive, the
    correlations) are summed group by group: same best poses and M-step
    entries, the rest equal up to float rounding.
    """
    from cryo2d.em import kernels
    from cryo2d.em.estep import coarse_references, coarse_subgrid, e_step_coarse_to_fine
    from cryo2d.em.rotation import RotationTable

    g = torch.Generator().manual_seed(5)
    pts = disc_points(BOX, 1, 12, half=True)
    psi, shifts = psi_grid(10.0), _shift_disc(3)
    A = _smooth_classes(5, g)
    refs, table = rotate_classes(A, pts.xy, psi, 2), RotationTable(A, pts.xy, psi, 2)
    phases = deshift_phases(pts.xy / BOX, shifts)
    n = 10
    X = refs[torch.arange(n) % 5, (torch.arange(n) * 7) % len(psi)] / phases[(torch.arange(n) * 5) % len(shifts)]
    sd = 0.5 * float(X.abs().mean())
    X = X + sd * torch.complex(torch.randn(n, len(pts), generator=g), torch.randn(n, len(pts), generator=g))
    args = (X, torch.ones(n, len(pts)), pts.weight / (2 * sd**2), None, phases, torch.full((5,), -math.log(5)), torch.ones(n))
    if search == "exhaustive":
        run = lambda r, **kw: e_step(*args[:3], r, *args[4:], mode=mode, **kw)  # noqa: E731
    else:
        grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), 6.0)
        run = lambda r, **kw: e_step_coarse_to_fine(*args[:3], r, *args[4:], grid, mode=mode, **kw)  # noqa: E731
    import cryo2d.em.estep as estep

    monkeypatch.setattr(estep, "TABLE_GROUP_VALUES", 2 * len(psi) * len(pts))  # 3 groups of classes
    if search == "exhaustive":
        dense, lazy = run(refs), run(table)
    else:
        pairs, dtype = search != "coarse_to_fine", torch.int8 if search == "coarse_int8" else torch.float32
        if dtype == torch.int8 and not kernels.available("cpu"):
            pytest.skip("Numba not installed")
        power = pts.weight / (2 * sd**2) * pts.weight  # the images' power, for the int8 balance
        Zd = coarse_references(refs, grid, refs.abs().square(), dtype, pairs=pairs, image_power=power)
        Zt = coarse_references(table, grid, None, dtype, pairs=pairs, image_power=power)
        if dtype == torch.int8:
            assert torch.equal(Zt[0].q, Zd[0].q) and torch.equal(Zt[0].scale, Zd[0].scale)
        dense, lazy = run(refs, coarse_refs=Zd), run(table, coarse_refs=Zt)
    for name in ("best_k", "best_r", "best_t", "entry_i", "entry_t", "entry_k", "entry_r"):
        assert torch.equal(getattr(lazy, name), getattr(dense, name)), name
    for name in ("best_cross", "best_norm", "class_post", "entry_w", "log_evidence", "max_prob"):
        torch.testing.assert_close(getattr(lazy, name), getattr(dense, name), rtol=1e-4, atol=1e-5, msg=name)


def test_pruned_fine_stage_drops_only_far_candidates():
    """Candidates far below a particle's best coarse pose are not refined: a bound of 0 keeps
    one class per particle (posteriors 0 or 1), a huge bound changes nothing, and the
    engine's bound (30 nats + a quarter of the perfect-fit gain) leaves the class posteriors
    of a noisy problem as they were."""
    from cryo2d.em.engine import PRUNE_NATS, PRUNE_SIGNAL
    from cryo2d.em.estep import e_step_coarse_to_fine

    n = 16
    args, grid = _noisy_search(4, seed=9, n=n, noise=3.0)
    full = e_step_coarse_to_fine(*args, grid, mode="soft")
    assert int((full.class_post > 0).sum()) > 2 * n  # other classes refined too: posteriors 1e-37 to 1e-20
    same = e_step_coarse_to_fine(*args, grid, mode="soft", prune=(1e9, 0.0))
    for name in ("entry_i", "entry_t", "entry_k", "entry_r", "entry_w", "class_post"):
        assert torch.equal(getattr(same, name), getattr(full, name))
    one = e_step_coarse_to_fine(*args, grid, mode="soft", prune=(0.0, 0.0))
    assert torch.equal((one.class_post > 0).sum(dim=1), torch.ones(n, dtype=torch.long))
    for i in range(n):
        assert len(torch.unique(one.entry_k[one.entry_i == i])) == 1
    near = e_step_coarse_to_fine(*args, grid, mode="soft", prune=(PRUNE_NATS, PRUNE_SIGNAL))
    assert (near.class_post > 0).sum() < (full.class_post > 0).sum()  # far classes: 0
    torch.testing.assert_close(near.class_post, full.class_post, atol=1e-12, rtol=1e-5)
    assert torch.equal(near.best_k, full.best_k) and torch.equal(near.best_r, full.best_r)


def test_fused_fine_kernel_sums_by_hand():
    """kernels.fine_cross = Re Σ P·e(t_c)·e(d)·conj(Z_row), in float64 by hand; skipped candidates 0."""
    pytest.importorskip("numba")
    from cryo2d.em import kernels

    g = torch.Generator().manual_seed(2)
    b, nc, m, n_rows, T, n_off = 5, 7, 37, 20, 11, 9

    def cplx(*shape):
        return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))

    P, phases, table = cplx(b, m), cplx(T, m), cplx(n_rows, m)
    # The offsets' phases: a 3 × 3 lattice (x fastest) of two unit steps u, w, as the shift grid makes them.
    u, w = (torch.polar(torch.ones(m), 2 * torch.pi * torch.rand(m, generator=g)) for _ in range(2))
    offsets = torch.stack([u**dx * w**dy for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    rows = torch.randint(0, n_rows, (b, nc, 3), generator=g)
    t_first = torch.randint(0, T, (b, nc), generator=g)
    skip = torch.rand(b, nc, generator=g) < 0.3
    out = kernels.fine_cross(P, phases, table, rows, t_first, skip, offsets)
    c128 = torch.complex128
    Y = P.to(c128)[:, None, :] * phases.to(c128)[t_first]  # (b, nc, m)
    Z = table.to(c128)[rows]  # (b, nc, 3, m)
    expected = torch.einsum("icm,icjm,dm->icjd", Y, Z.conj(), offsets.to(c128)).real
    expected[skip] = 0.0
    assert out.dtype == torch.float32 and out.shape == (b, nc, 3, n_off)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3)
    assert (out[skip] == 0).all() and (out[~skip] != 0).all()
    with pytest.raises(ValueError, match="3 x 3"):
        kernels.fine_cross(P, phases, table, rows, t_first, skip, offsets[:8])


@pytest.mark.parametrize("refs_kind", ["dense", "table"])
@pytest.mark.parametrize("mode", ["soft", "max_pose", "hard"])
def test_fine_stage_kernel_and_torch_give_the_same_search(refs_kind, mode, monkeypatch):
    """The fused CPU kernel and the torch fine stage (GPU) keep the same poses with the same weights."""
    pytest.importorskip("numba")
    from cryo2d.em import kernels
    from cryo2d.em.estep import e_step_coarse_to_fine
    from cryo2d.em.rotation import RotationTable

    args, grid = _noisy_search(4, seed=9, n=11, noise=4.0)
    if refs_kind == "table":
        g = torch.Generator().manual_seed(9)
        A = _smooth_classes(4, g)
        refs = RotationTable(A, disc_points(BOX, 1, 12, half=True).xy, psi_grid(10.0), 2)
        args = (*args[:3], refs, *args[4:])
    fused = e_step_coarse_to_fine(*args, grid, mode=mode)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    plain = e_step_coarse_to_fine(*args, grid, mode=mode)
    for name in ("best_k", "best_r", "best_t", "entry_i", "entry_t", "entry_k", "entry_r"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    for name in ("best_cross", "best_norm", "class_post", "entry_w", "log_evidence"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-4, atol=1e-4, msg=name)
    assert len(fused.entry_w) > (11 if mode == "soft" else 10)


def _fine_poses(null_class: int, spread: float = 60.0) -> tuple:
    """The fine stage's poses as :func:`_summarise_poses` takes them (40 particles, 8 candidates, 9 offsets, K = 5,
    R = 12): poses outside the disc, skipped candidates, poses two candidates share and, with
    ``null_class`` ≥ 0, the empty-box class's single pose; correlations of SD ``spread``."""
    g = torch.Generator().manual_seed(5)
    b, nc, n_off, K, R = 40, 8, 9, 5, 12
    cand_k = torch.randint(0, K, (b, nc), generator=g)
    cand_r = torch.randint(0, R, (b, nc), generator=g)
    cand_k[:, 0], cand_r[:, 0] = 3, 2  # class 3 also outside its own slot
    cand_k[:, 3] = 3  # candidate k < K is class k in the search: slot 3 is the empty-box class when null_class = 3
    t_c = torch.randint(-1, 30, (b, nc, n_off), generator=g)
    # Rows 0-9: candidate 2 is candidate 1 one rotation on, at the same shifts: 2 of its 3 rotations repeat.
    cand_k[:10, 2], cand_r[:10, 2], t_c[:10, 2] = cand_k[:10, 1], (cand_r[:10, 1] + 1) % R, t_c[:10, 1]
    kr_c = torch.stack([cand_k * R + (cand_r + d) % R for d in (-1, 0, 1)], dim=2)
    cross = torch.randn(b, nc, 3, n_off, generator=g) * spread
    norm3 = torch.rand(b, nc, 3, generator=g) * spread * 10 / 3
    copy = torch.rand(b, nc, generator=g) < 0.2
    copy[:, 1] = False
    close = torch.zeros(b, dtype=torch.bool)
    close[:14] = True
    scale = torch.rand(b, generator=g) + 0.5
    log_prior = torch.randn(K, generator=g) * 0.1
    null_logp = float(log_prior[null_class]) + math.log(30 * R) if null_class >= 0 else 0.0
    return cross, norm3, t_c, kr_c, copy, close, scale, log_prior, 1.7, K, R, null_class, null_logp


@pytest.mark.parametrize("null_class", [-1, 3])
def test_hard_pose_kernel_picks_torchs_best_pose(null_class):
    """kernels.hard_poses (hard mode's summary of the fine poses) against scoring every pose in torch
    (estep._summarise_poses): the same best pose, probabilities to float32 rounding. Poses outside
    the disc, skipped candidates, poses two candidates share (counted once) and the empty-box class's
    single pose are all in the set; log-probabilities spread over hundreds of nats, so most weights
    fall below the exp floor."""
    pytest.importorskip("numba")
    from cryo2d.em.estep import _hard_summary, _summarise_poses

    args = _fine_poses(null_class)
    fused = _hard_summary(*args)
    plain = _summarise_poses(*args, "hard", 48, 5e-3)
    for name in ("best_k", "best_r", "best_t", "entry_i", "entry_t", "entry_k", "entry_r", "best_cross", "best_norm"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    for name in ("class_post", "max_prob", "entry_w", "log_evidence"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=2e-6, atol=2e-6, msg=name)
    assert 0.2 < float(plain.max_prob.min()) and float(plain.max_prob.min()) < 0.99  # some particles' weight is spread
    if null_class >= 0:
        assert bool((plain.best_k == null_class).any()) and bool((plain.best_k != null_class).any())


@pytest.mark.parametrize("mode", ["soft", "max_pose", "hard_class"])
@pytest.mark.parametrize("null_class", [-1, 3])
def test_pose_logp_kernel_gives_torchs_summary_bit_for_bit(mode, null_class):
    """kernels.pose_logp and kernels.class_sums (estep._kernel_summary) against estep._summarise_poses:
    every output the same bits, posteriors spread over many poses (the set of the test above)."""
    pytest.importorskip("numba")
    from cryo2d.em.estep import _kernel_summary, _summarise_poses

    args = _fine_poses(null_class, spread=3.0)
    fused = _kernel_summary(*args, mode, 48, 1e-3)
    plain = _summarise_poses(*args, mode, 48, 1e-3)
    for name in ("class_post", "best_t", "best_k", "best_r", "max_prob", "best_cross", "best_norm", "entry_i",
                 "entry_t", "entry_k", "entry_r", "entry_w", "log_evidence"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    assert len(plain.entry_w) > (40 if mode == "max_pose" else 10 * 40)  # many poses (max_pose: classes) a particle
    assert float(plain.class_post.max(dim=1).values.min()) < 0.9  # classes share some particles


def test_best_pose_residual_kernel_matches_bilinear_sampling():
    """kernels.best_pose_residual = the residual X·e(t) − s·C·(class at −ψ, sample_half) per shell and whitened,
    in float64 from rotation.sample_half; angles on both sides of the x = 0 mirror."""
    pytest.importorskip("numba")
    from cryo2d.em import kernels
    from cryo2d.em.rotation import oversample, rotated_points, sample_half

    g = torch.Generator().manual_seed(4)
    K, b, zeropad = 3, 6, 2
    pts = disc_points(BOX, 1, BOX // 2 - 1, half=True)
    m = len(pts)
    A = _smooth_classes(K, g)
    G = oversample(A, zeropad)
    shifts = _shift_disc(2)
    phases = deshift_phases(pts.xy / BOX, shifts)
    k_idx = torch.tensor([0, 1, 2, 0, 1, 2])
    t_idx = torch.randint(0, len(shifts), (b,), generator=g)
    psi = torch.tensor([0.0, 0.7, 2.0, 3.5, 5.1, 6.2])
    scale = torch.rand(b, generator=g) + 0.5
    X = torch.complex(torch.randn(b, m, generator=g), torch.randn(b, m, generator=g))
    C = torch.rand(b, m, generator=g) * 2 - 1
    shell = pts.xy.norm(dim=1).round().long()
    n_shells = int(shell.max()) + 1
    w_sig = pts.weight / (torch.rand(n_shells, generator=g) + 0.5)[shell]
    chi2, per_shell = kernels.best_pose_residual(torch.view_as_complex(G.permute(0, 2, 3, 1)), k_idx, psi, t_idx, scale,
                                                 X, C, phases, pts.xy, zeropad, w_sig, shell, n_shells)
    Zb = sample_half(G[k_idx], rotated_points(pts.xy, -psi).unsqueeze(1), zeropad)[:, :, 0].double()
    resid = (X.to(torch.complex128) * phases[t_idx] - scale[:, None].double() * C.double() * torch.complex(Zb[:, 0], Zb[:, 1])).abs() ** 2
    expected_shell = torch.zeros(b, n_shells, dtype=torch.float64).index_add_(1, shell, resid)
    torch.testing.assert_close(per_shell, expected_shell, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chi2.double(), (resid * w_sig.double()).sum(dim=1), rtol=1e-4, atol=1e-3)
    assert float(Zb.abs().max()) > 0.1 * float(X.abs().mean())  # the classes are sampled, not zero


def test_coarse_max_kernel_is_torchs_amax_and_argmax():
    """kernels.coarse_max on bfloat16 scores: torch's best value and first best row for every column, ties and
    signed zeros included."""
    pytest.importorskip("numba")
    from cryo2d.em import kernels

    g = torch.Generator().manual_seed(2)
    for Tc in (1, 7, 33):
        scores = (torch.randn(50, Tc, 90, generator=g) * 40).to(torch.bfloat16)
        tied = torch.round(scores[:25].float() / 40)
        tied[tied == 0] = -0.0
        scores[:25] = tied.to(torch.bfloat16)  # few distinct values: ties and -0 against +0
        best, arg = kernels.coarse_max(scores)
        assert best.dtype == torch.float32 and arg.dtype == torch.int64
        assert torch.equal(best, scores.amax(dim=1).float())
        assert torch.equal(arg, scores.argmax(dim=1))
        if Tc > 1:
            assert bool((arg[:25] > 0).any()) and bool((arg[:25] == 0).any())


def test_coarse_images_kernel_is_torchs_product_rounded_to_bfloat16():
    """kernels.coarse_images: the bits of torch's complex product rounded to bfloat16, including halfway cases
    (rounded to even), signed zeros and values that span many octaves."""
    pytest.importorskip("numba")
    from cryo2d.em import kernels

    g = torch.Generator().manual_seed(3)
    b, Tc, Mc = 9, 5, 37
    P = torch.complex(torch.randn(b, Mc, generator=g), torch.randn(b, Mc, generator=g)) * torch.logspace(-3, 3, Mc)
    angle = torch.rand(Tc, Mc, generator=g) * 2 * torch.pi
    phases = torch.polar(torch.ones(Tc, Mc), angle)
    phases[0] = 1.0  # the products are P itself: halfway values below round to even
    top = torch.randint(0x3000, 0x5000, (b, 2 * Mc), generator=g) | (torch.randint(0, 2, (b, 2 * Mc), generator=g) << 15)
    halfway = ((top << 16) | 0x8000).int().view(torch.float32)  # 1e-19 … 1e19, either sign, half a bfloat16 step
    P[: b // 2] = torch.view_as_complex(halfway.view(b, Mc, 2))[: b // 2]
    P[-1, :3] = torch.tensor([0.0, -0.0, complex(-0.0, 0.0)], dtype=torch.complex64)
    want = torch.view_as_real(P.unsqueeze(1) * phases.unsqueeze(0)).reshape(b * Tc, 2 * Mc).to(torch.bfloat16)
    got = kernels.coarse_images(P, phases)
    assert got.dtype == torch.bfloat16 and got.shape == (b * Tc, 2 * Mc)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # halfway cases went both ways (to even), so the rounding, not truncation, is what matched
    low = halfway[: b // 2].view(torch.int32) >> 16 & 1
    assert bool((low == 0).any()) and bool((low == 1).any())
