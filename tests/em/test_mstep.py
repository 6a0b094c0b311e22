"""M-step: pose sums, back-rotation and the Wiener solve on noiseless data."""
from __future__ import annotations

import math

import numpy as np
import torch
from test_rotation import analytic_blobs

from cryo2d.ctf import ctf_2d
from cryo2d.em.estep import EStepResult, deshift_phases
from cryo2d.em.geometry import disc_points, hermitian_grid
from cryo2d.em.mstep import PoseSums, estimate_tau2, resolution_shell, shell_mean, solve_classes
from cryo2d.em.rotation import psi_grid
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
    sums = PoseSums(1, R, len(pts), "cpu")
    sums.add(X, C, torch.ones(n), deshift_phases(pts.xy / BOX, shifts), _entries(r, t))
    assert float(sums.counts[0]) == n
    num, den = sums.class_frame(psi, pts, BOX, 2)
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
