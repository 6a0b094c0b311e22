"""In-plane rotation of classes in Fourier space with zero-padded oversampling.

A class image rotated by ψ has the transform A(R(−ψ) f). We sample centred
transforms at rotated frequencies by bilinear interpolation on a grid
oversampled ``zeropad`` times (the class is zero-padded in real space to
``zeropad × work_box`` before its FFT), after dividing the image by the
real-space apodisation that linear interpolation causes (sinc², the usual
gridding correction). ``zeropad = 1`` skips the padding: less memory, more
interpolation error.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import Tensor

from cryo2d.fourier import fft2c, ifft2c


def _gridding_correction(box: int, padded: int, device) -> Tensor:
    """(box, box) sinc² apodisation of linear interpolation on a ``padded`` grid."""
    x = (torch.arange(box, device=device, dtype=torch.float64) - box // 2) / padded
    s = torch.special.sinc(x)
    return (s[:, None] ** 2 * s[None, :] ** 2).float()


def oversample(F: Tensor, zeropad: int) -> Tensor:
    """Oversample centred transforms of real images for interpolation.

    Parameters
    ----------
    F : (n, b, b) complex tensor
        Centred transforms (zero frequency at [b//2, b//2]) of real images.
    zeropad : int
        Oversampling factor (≥ 1).

    Returns
    -------
    (n, 2, p, p) float tensor, p = zeropad · b
        Real and imaginary parts of the oversampled centred transform: its
        element at offset u from the centre holds frequency u / zeropad.
    """
    n, b, _ = F.shape
    p = zeropad * b
    img = ifft2c(F, real=True) / _gridding_correction(b, p, F.device)
    if p != b:
        lo = p // 2 - b // 2
        padded = torch.zeros((n, p, p), dtype=img.dtype, device=img.device)
        padded[:, lo : lo + b, lo : lo + b] = img
        img = padded
    G = fft2c(img)
    return torch.stack([G.real, G.imag], dim=1).contiguous()


def rotated_points(xy: Tensor, angles_rad: Tensor) -> Tensor:
    """Points ``xy`` rotated counter-clockwise by each angle.

    Parameters
    ----------
    xy : (m, 2) float tensor
        (x, y) coordinates.
    angles_rad : (r,) float tensor
        Rotation angles, radians.

    Returns
    -------
    (r, m, 2) float tensor
    """
    c = torch.cos(angles_rad)[:, None]
    s = torch.sin(angles_rad)[:, None]
    x, y = xy[:, 0][None], xy[:, 1][None]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def sample_grid(G: Tensor, points: Tensor, zeropad: int) -> Tensor:
    """Bilinear samples of oversampled centred grids at frequency points.

    Parameters
    ----------
    G : (n, c, p, p) float tensor
        ``c`` channels of centred grids with oversampling ``zeropad`` (from
        :func:`oversample`, or a real grid with ``zeropad = 1``).
    points : (n, r, m, 2) or (r, m, 2) float tensor
        (x, y) frequencies in Fourier px of the un-oversampled grid; the same
        points for every grid when 3-D.
    zeropad : int

    Returns
    -------
    (n, c, r, m) float tensor; zero outside the grid.
    """
    n, _, p, _ = G.shape
    if points.ndim == 3:
        points = points.unsqueeze(0).expand(n, -1, -1, -1)
    scale = 2.0 / (p - 1)
    grid = (points * zeropad + p // 2) * scale - 1.0
    return nnf.grid_sample(G, grid.to(G.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def rotate_classes(A: Tensor, xy: Tensor, psi_rad: Tensor, zeropad: int) -> Tensor:
    """Transforms of the classes rotated by each ψ, at the points ``xy``.

    Parameters
    ----------
    A : (k, b, b) complex tensor
        Centred transforms of the class images.
    xy : (m, 2) float tensor
        Frequencies (Fourier px) where the rotated transforms are wanted.
    psi_rad : (r,) float tensor
        In-plane angles: the output is the transform of the class rotated
        counter-clockwise by ψ, i.e. A(R(−ψ) f).
    zeropad : int

    Returns
    -------
    (k, r, m) complex tensor
    """
    G = oversample(A, zeropad)
    out = sample_grid(G, rotated_points(xy, -psi_rad), zeropad)
    return torch.complex(out[:, 0], out[:, 1])


def unrotate_sums(S: Tensor, Q: Tensor, psi_rad: Tensor, xy: Tensor, zeropad: int) -> tuple[Tensor, Tensor]:
    """Bring sums accumulated in rotated frames back to the class frame.

    Parameters
    ----------
    S : (c, b, b) complex tensor
        Centred sums of CTF-weighted, de-shifted images, one per (class,
        angle) combination, in the frame of particles at angle ``psi_rad[c]``.
    Q : (c, b, b) float tensor
        Matching sums of CTF² (real, symmetric): interpolated directly.
    psi_rad : (c,) float tensor
        Angle of each combination.
    xy : (m, 2) float tensor
        Class-frame frequencies where the sums are wanted.
    zeropad : int

    Returns
    -------
    (c, m) complex tensor and (c, m) float tensor
        S(R(ψ) g) and Q(R(ψ) g) for each class-frame frequency g.
    """
    pts = rotated_points(xy, psi_rad).unsqueeze(1)  # (c, 1, m, 2)
    G = oversample(S, zeropad)
    s_out = sample_grid(G, pts, zeropad)[:, :, 0]
    q_out = sample_grid(Q.unsqueeze(1), pts, 1)[:, 0, 0]
    return torch.complex(s_out[:, 0], s_out[:, 1]), q_out


def psi_grid(step_deg: float, device=None) -> Tensor:
    """Angles 0, step, 2·step, … < 360°, in radians, as a float32 tensor."""
    n = max(1, int(round(360.0 / step_deg)))
    return torch.arange(n, device=device, dtype=torch.float64).mul(2 * math.pi / n).float()
