"""M-step: pose sums, back-rotation and the Wiener solve on noiseless data."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_rotation import analytic_blobs

from cryo2d.ctf import ctf_2d
from cryo2d.em.estep import EStepResult, deshift_phases
from cryo2d.em.geometry import disc_points, hermitian_grid
from cryo2d.em.mstep import (
    PoseSums, class_resolution_shell, estimate_tau2, gamma_quantile, resolution_shell, robust_shell_noise, shell_mean,
    solve_classes, ssnr,
)
from cryo2d.em.rotation import half_plane, psi_grid, unrotate_sums
from cryo2d.fourier import fft2c, freq_grid, ifft2c, shift_images
from cryo2d.particles import CTFParams

BOX, PIX = 32, 4.0


def _ctf(n: int) -> CTFParams:
    full = lambda v: np.full(n, float(v))  # noqa: E731
    defocus = np.linspace(8000, 25000, n)
    return CTFParams(defocus, defocus - 200, full(30), full(300), full(2.7), full(0.1), full(0), full(0))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _entries(r: torch.Tensor, t: torch.Tensor) -> EStepResult:
    n = len(r)
    ar = torch.arange(n)
    one = torch.ones(n)
    return EStepResult(torch.ones(n, 1), t, ar * 0, r, one, one, one, ar, t, ar * 0, r, one, one)


def _solve_noiseless(shifted: bool):
    """Particles = CTF · shift_t(rotate_ψ(image)); accumulate with the true poses and solve."""
    psi = psi_grid(30.0)
    R = len(psi)
    r = torch.arange(3 * R) % R  # every angle three times, different defoci
    n = len(r)
    shifts = torch.tensor([[0.0, 0.0], [2.0, -1.0], [-3.0, 1.0]])
    t = (torch.arange(n) % 3) if shifted else torch.zeros(n, dtype=torch.long)
    rotated = torch.stack([analytic_blobs(math.degrees(float(psi[i]))) for i in r])
    images = shift_images(rotated, shifts[t])
    ctf = ctf_2d(freq_grid(BOX, PIX), _ctf(n))
    F = fft2c(images) * ctf
    pts = disc_points(BOX, 0, BOX / 2 - 1, half=True)
    X, C = F.flatten(1)[:, pts.flat], ctf.flatten(1)[:, pts.flat]
    sums = PoseSums(1, psi, pts, BOX, 2, "cpu")
    sums.add(X, C, torch.ones(n), deshift_phases(pts.xy / BOX, shifts), _entries(r, t))
    assert float(sums.counts[0]) == n
    num, den = sums.class_frame()
    n_shells = BOX // 2 + 1
    sigma2 = torch.full((len(pts),), 1e-4)
    tau2 = estimate_tau2(num, den, sigma2, pts.shell, n_shells, 2.0)
    A = solve_classes(num, den, sigma2, tau2, pts.shell)
    return ifft2c(hermitian_grid(A, pts, BOX), real=True)[0], (num, den, sigma2, pts, n_shells)


def test_wiener_solve_recovers_the_image():
    image, _ = _solve_noiseless(shifted=False)
    assert _corr(image, analytic_blobs()) > 0.99


def test_wiener_solve_recovers_the_image_from_shifted_particles():
    image, _ = _solve_noiseless(shifted=True)
    assert _corr(image, analytic_blobs()) > 0.99


def test_strong_regularisation_shrinks_the_class():
    image, (num, den, sigma2, pts, n_shells) = _solve_noiseless(shifted=False)
    tiny_tau2 = torch.full((1, n_shells), 1e-8)  # σ²/τ² = 1e4 ≫ Σ CTF²
    shrunk = ifft2c(hermitian_grid(solve_classes(num, den, sigma2, tiny_tau2, pts.shell), pts, BOX), real=True)[0]
    assert float(shrunk.norm()) < 0.1 * float(image.norm())


def test_shell_mean():
    shell = torch.tensor([0, 1, 1, 2, 2, 2])
    vals = torch.tensor([[1.0, 2.0, 4.0, 3.0, 3.0, 6.0]])
    torch.testing.assert_close(shell_mean(vals, shell, 4), torch.tensor([[1.0, 3.0, 4.0, 0.0]]))


def test_resolution_shell_is_last_shell_before_snr_drops_below_one():
    snr = torch.tensor([[100.0, 50.0, 10.0, 2.0, 0.5, 3.0], [9.0, 9.0, 9.0, 9.0, 9.0, 9.0], [5.0, 0.1, 0.1, 0.1, 0.1, 0.1]])
    assert resolution_shell(snr).tolist() == [3, 5, 1]


def test_class_resolution_skips_the_low_ctf_dip_and_smooths():
    """A dip below 1 at the lowest shells (CTF near its amplitude contrast) does not end the class's resolution."""
    snr = torch.tensor([
        [0.0, 0.6, 0.8, 3.0, 9.0, 12.0, 6.0, 2.0, 0.9, 0.8, 0.5],  # small class: dip at shells 1-2, signal to 7
        [0.0, 100.0, 50.0, 10.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1],  # large class: falls off from the start
        [0.0, 0.9, 0.5, 0.8, 0.7, 0.9, 0.6, 0.8, 0.5, 0.4, 0.3],  # noise: never reaches 1
        [0.0, 8.0, 8.0, 8.0, 8.0, 0.1, 8.0, 8.0, 8.0, 8.0, 8.0],  # one bad shell: smoothed over, signal to Nyquist
    ])
    # Smoothed over 3 shells: class 0 peaks at shell 5, first below 1 at shell 9 -> 8.
    assert class_resolution_shell(snr).tolist() == [8, 4, 1, 10]
    assert resolution_shell(snr).tolist() == [1, 4, 1, 4]  # the search's first drop, for comparison


def test_class_resolution_stays_within_the_band():
    """Shells past the band (no points: SSNR 0) are not smoothed in: a class with signal up to the band's
    last shell is reported at that shell, not past it."""
    snr = torch.tensor([[100.0, 50.0, 40.0, 30.0, 20.0, 0.0, 0.0], [100.0, 50.0, 0.5, 0.3, 0.2, 0.0, 0.0]])
    assert class_resolution_shell(snr, last=4).tolist() == [4, 2]
    assert class_resolution_shell(snr).tolist() == [5, 2]  # with the empty shells: shell 5, which holds nothing


@pytest.mark.parametrize("fused", [True, False])
def test_pose_sums_match_the_defining_sum_over_entries(fused, monkeypatch):
    """S[k, r] = Σ w · s · c · exp(2πi f·t) · X and Q[k, r] = Σ w · s² · c², entry by entry, in float64.

    Random soft entries: several per particle, repeated (particle, shift)
    pairs across rotations and repeated (particle, class, rotation) across
    shifts, as the E-step's significant poses are. Both ways of adding them:
    the fused CPU kernel (``kernels.scatter_sums``) and the torch sparse product (GPU).
    """
    from cryo2d.em import kernels

    if fused:
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(kernels, "available", lambda device: False)
    g = torch.Generator().manual_seed(5)
    pts = disc_points(12, 0, 3.5, half=True)
    b, m, K, R, T, e = 7, len(pts), 3, 4, 5, 60
    X = torch.complex(torch.randn(b, m, generator=g), torch.randn(b, m, generator=g))
    ctf, scale = torch.rand(b, m, generator=g), 0.5 + torch.rand(b, generator=g)
    phases = torch.polar(torch.ones(T, m), 6.3 * torch.rand(T, m, generator=g))
    i, t = torch.randint(0, b, (e,), generator=g), torch.randint(0, 2, (e,), generator=g)
    k, r = torch.randint(0, K, (e,), generator=g), torch.randint(0, R, (e,), generator=g)
    key = torch.unique(((i * T + t) * K + k) * R + r)  # one entry per (particle, shift, class, rotation)
    r, k, t, i = key % R, key // R % K, key // (R * K) % T, key // (R * K * T)
    w = torch.rand(len(key), generator=g)
    res = EStepResult(torch.ones(b, K), t, k, r, w, w, w, i, t, k, r, w, w)
    sums = PoseSums(K, psi_grid(90.0), pts, 12, 2, "cpu")
    sums.add(X, ctf, scale, phases, res)
    got_S, got_Q = sums.dense()
    S = torch.zeros(K * R, m, dtype=torch.complex128)
    Q = torch.zeros(K * R, m, dtype=torch.float64)
    for n in range(len(key)):
        row = int(k[n] * R + r[n])
        S[row] += float(w[n]) * float(scale[i[n]]) * (ctf[i[n]] * phases[t[n]] * X[i[n]]).to(torch.complex128)
        Q[row] += float(w[n]) * float(scale[i[n]]) ** 2 * ctf[i[n]].double() ** 2
    torch.testing.assert_close(torch.view_as_complex(got_S).to(torch.complex128), S, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_Q.double(), Q, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sums.counts, torch.zeros(K, dtype=torch.float64).index_add_(0, k, w.double()))


def test_pose_sums_over_budget_back_rotate_in_parts_with_the_same_result():
    """Sums that outgrow their budget are back-rotated in parts; the class-frame sums agree with one back-rotation.

    Five classes × 12 rotations, 40 particles added in chunks of 5 with a
    random (class, rotation) each: a budget of 8 rows makes the sums
    back-rotate several times, each row up to several times. ``max_rows``
    (one row per particle, as in hard mode) makes room for 40 rows, not 60,
    and changes nothing else.
    """
    g = torch.Generator().manual_seed(2)
    psi = psi_grid(30.0)
    pts = disc_points(BOX, 0, BOX / 2 - 1, half=True)
    K, R, m, n = 5, len(psi), len(pts), 40
    X = torch.complex(torch.randn(n, m, generator=g), torch.randn(n, m, generator=g))
    ctf = 0.2 + torch.rand(n, m, generator=g)
    k, r = torch.randint(0, K, (n,), generator=g), torch.randint(0, R, (n,), generator=g)
    one_phase = torch.ones((1, m), dtype=torch.complex64)
    results = []
    for budget, max_rows in ((1 << 30, None), (8 * 12 * m, None), (1 << 30, n)):
        sums = PoseSums(K, psi, pts, BOX, 2, "cpu", budget_bytes=budget, max_rows=max_rows)
        for c in range(0, n, 5):
            ar, one = torch.arange(5), torch.ones(5)
            res = EStepResult(torch.ones(5, K), ar * 0, k[c : c + 5], r[c : c + 5], one, one, one, ar, ar * 0,
                              k[c : c + 5], r[c : c + 5], one, one)
            sums.add(X[c : c + 5], ctf[c : c + 5], torch.ones(5), one_phase, res)
        results.append((*sums.class_frame(), sums.flushes, sums.S.shape[0]))
    (num, den, flushes, rooms), (num_b, den_b, flushes_b, rooms_b), (num_c, den_c, flushes_c, rooms_c) = results
    assert (flushes, rooms) == (1, K * R) and flushes_b >= 3 and rooms_b == 8 and (flushes_c, rooms_c) == (1, n)
    assert torch.equal(num_c, num) and torch.equal(den_c, den)
    torch.testing.assert_close(num_b, num, atol=1e-4 * float(num.abs().max()), rtol=1e-5)
    torch.testing.assert_close(den_b, den, atol=1e-4 * float(den.abs().max()), rtol=1e-5)


def test_resolution_of_a_class_with_a_strong_low_frequency_stops_where_its_signal_does():
    """Signal in shells ≤ 4 only, 10⁴ times stronger at the origin: the SSNR resolution is shell 4-5, not Nyquist.

    With τ² floored at 10⁻⁶ of its largest shell (the origin) the noise-only
    shells kept an SSNR above 1 and the resolution went to the edge.
    """
    g = torch.Generator().manual_seed(2)
    pts = disc_points(BOX, 0, BOX / 2 - 1, half=True)
    n_shells = BOX // 2 + 1
    den = torch.full((1, len(pts)), 50.0)
    sigma2 = torch.ones(len(pts))
    signal = torch.where(pts.shell <= 4, 3.0, 0.0) + torch.where(pts.shell == 0, 1e4, 0.0)
    noise = torch.complex(torch.randn(1, len(pts), generator=g), torch.randn(1, len(pts), generator=g)) * (50.0 / 2) ** 0.5
    num = den * signal + noise
    tau2 = estimate_tau2(num, den, sigma2, pts.shell, n_shells, 2.0)
    snr = ssnr(den, sigma2, tau2, pts.shell, n_shells, 2.0)
    assert 4 <= int(resolution_shell(snr)[0]) <= 5
    assert float(snr[0, 6 : BOX // 2].max()) < 1.0  # every noise-only shell (10⁻⁶ of τ²(0) would give SSNR 5000)


def test_sparse_product_sums_repeated_pairs_without_warning(monkeypatch):
    """W[row, col] += weight times a dense matrix equals the dense product (repeated pairs add),
    and PyTorch 2.11's warning that invariant checks are off (they are, on purpose) is not shown."""
    import warnings

    from cryo2d.em import mstep

    real = torch.sparse_coo_tensor

    def warning_coo(*args, **kwargs):  # what PyTorch 2.11 does
        warnings.warn("Sparse invariant checks are implicitly disabled. Memory errors (e.g. SEGFAULT) will occur")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "sparse_coo_tensor", warning_coo)
    row, col = torch.tensor([0, 2, 2, 1, 2]), torch.tensor([1, 0, 0, 3, 2])
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    dense = torch.arange(12.0).reshape(4, 3)
    W = torch.zeros(3, 4, dtype=torch.float64)
    W.index_put_((row, col), weight.double(), accumulate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mstep._sparse_times(row, col, weight, 3, dense)
    torch.testing.assert_close(out.double(), W @ dense.double())


@pytest.mark.parametrize("step,folded_rows", [(30.0, 3), (60.0, 3), (72.0, 5), (45.0, 2)])
def test_pose_sums_turn_rows_a_quarter_or_half_turn_apart_onto_one_back_rotation(monkeypatch, step, folded_rows):
    """Rows whose angles differ by quarter (or half) turns share one back-rotation, and the class sums are unchanged.

    Reference: each (class, rotation) row back-rotated on its own by
    ``unrotate_sums`` and added per class. 12 and 8 rotations fold four rows
    into one, 6 rotations two, 5 none (the count of rows back-rotated per class).
    """
    import cryo2d.em.mstep as mstep

    g = torch.Generator().manual_seed(5)
    psi = psi_grid(step)
    pts = disc_points(BOX, 0, BOX / 2 - 1, half=True)
    K, R, m = 2, len(psi), len(pts)
    n = K * R * 3
    X = torch.complex(torch.randn(n, m, generator=g), torch.randn(n, m, generator=g))
    X[:, (pts.xy == 0).all(dim=1)] = X[:, (pts.xy == 0).all(dim=1)].real.to(X.dtype)  # real origins
    ctf = 0.2 + torch.rand(n, m, generator=g)
    k, r = torch.arange(n) % K, torch.arange(n) // K % R  # every row three times
    sums = PoseSums(K, psi, pts, BOX, 2, "cpu")
    ar, one = torch.arange(n), torch.ones(n)
    sums.add(X, ctf, one, torch.ones((1, m), dtype=torch.complex64),
             EStepResult(torch.ones(n, K), ar * 0, k, r, one, one, one, ar, ar * 0, k, r, one, one))
    S, Q = sums.dense()
    want_num = torch.zeros((K, m), dtype=torch.complex128)
    want_den = torch.zeros((K, m), dtype=torch.float64)
    for row in range(K * R):
        Sg = half_plane(torch.view_as_complex(S[row : row + 1].contiguous()), pts, BOX)
        s_cls, q_cls = unrotate_sums(Sg, hermitian_grid(Q[row : row + 1], pts, BOX), psi[row % R : row % R + 1], pts.xy, 2)
        want_num[row // R] += s_cls[0].to(torch.complex128)
        want_den[row // R] += q_cls[0].double()
    seen = []
    real_unrotate = mstep.unrotate_sums
    monkeypatch.setattr(mstep, "unrotate_sums", lambda S, Q, psi, xy, zp: seen.append(len(psi)) or real_unrotate(S, Q, psi, xy, zp))
    torch_sums = copy.deepcopy(sums)
    num, den = sums.class_frame()
    assert sum(seen) == K * folded_rows
    scale = float(want_num.abs().max())
    torch.testing.assert_close(num.to(torch.complex128), want_num, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(den.double(), want_den, atol=1e-5 * float(want_den.abs().max()), rtol=0)
    # The turns as the torch code makes them (a GPU's path), where the CPU kernel made them: the same bits.
    monkeypatch.setattr(mstep.kernels, "available", lambda device: False)
    num_t, den_t = torch_sums.class_frame()
    assert torch.equal(num_t, num) and torch.equal(den_t, den)


def test_gamma_quantile_matches_scipy():
    from scipy.stats import gamma

    k = np.array([0.5, 1.0, 1.5, 4.0, 6.0, 28.5, 200.0])
    for p in (0.5, 0.999):
        np.testing.assert_allclose(gamma_quantile(torch.from_numpy(k), p).numpy(), gamma.ppf(p, k), rtol=1e-9)
    assert abs(float(gamma_quantile(torch.tensor([1.0]), 0.5)[0]) - math.log(2)) < 1e-12  # exponential: ln 2


def _shell_residuals(rng, n, sigma2, points):
    """(n, n_shells) summed |residual|² of Gaussian noise with variance sigma2[shell] at each half-plane point."""
    m = len(points.shell)
    origin = (points.xy == 0).all(dim=1).numpy()
    var = sigma2[points.shell.numpy()]
    re = rng.standard_normal((n, m)) * np.sqrt(np.where(origin, var, var / 2))
    im = np.where(origin, 0.0, rng.standard_normal((n, m)) * np.sqrt(var / 2))
    out = np.zeros((n, len(sigma2)))
    np.add.at(out.T, points.shell.numpy(), (re**2 + im**2).T)
    return torch.from_numpy(out)


def test_robust_shell_noise_is_the_noise_power_and_ignores_low_frequency_junk():
    """Gaussian residuals with a falling spectrum, 3,000 particles: the trimmed σ² per shell matches the true
    one as the mean does; with 5 % of the images 50x stronger at shells 0-2 (ice gradients) the mean is
    inflated about 3.5x there, the trimmed estimate by a few per cent (those images are left out; the
    median that sets the cut moves by their share)."""
    rng = np.random.default_rng(0)
    points = disc_points(32, 0, 15, half=True)
    n_shells = 16
    sigma2 = 100.0 / (1.0 + (np.arange(n_shells) / 4.0) ** 2) + 5.0
    counts = torch.bincount(points.shell, minlength=n_shells).double()
    resid = _shell_residuals(rng, 3000, sigma2, points)
    clean = robust_shell_noise(resid, counts).numpy()
    tol = np.where(np.arange(n_shells) == 0, 0.08, 0.04)  # shell 0 is one real value a particle
    assert np.all(np.abs(clean / sigma2 - 1) < tol), clean / sigma2
    junk = resid.clone()
    junk[:150, :3] *= 50.0
    mean = (junk.sum(dim=0) / (3000 * counts)).numpy()
    robust = robust_shell_noise(junk, counts).numpy()
    assert np.all(mean[:3] / sigma2[:3] > 3.0), mean[:3] / sigma2[:3]
    assert np.all(np.abs(robust / sigma2 - 1) < tol), robust / sigma2
    np.testing.assert_allclose(robust[3:], clean[3:])  # the shells the junk does not touch
    mean_clean = (resid.sum(dim=0) / (3000 * counts)).numpy()
    np.testing.assert_allclose(clean[1:], mean_clean[1:], rtol=0.01)  # 1 in 1,000 left out, and the mean corrected


def test_robust_shell_noise_skips_shells_without_points():
    points = disc_points(32, 3, 10, half=True)  # a high-pass: shells 0-2 hold no points
    counts = torch.bincount(points.shell, minlength=12).double()
    resid = _shell_residuals(np.random.default_rng(1), 500, np.full(12, 7.0), points)
    est = robust_shell_noise(resid, counts).numpy()
    assert np.all(est[:3] == 0) and np.all(est[11:] == 0)
    assert np.all(np.abs(est[3:11] / 7.0 - 1) < 0.06), est
