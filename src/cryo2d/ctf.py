"""Contrast transfer function, RELION's ``CTF::getCTF`` convention.

For a spatial frequency (x, y) in 1/Å, u² = x² + y², θ = atan2(y, x):

- wavelength λ (Å) = 12.2643247 / sqrt(V·(1 + V·0.978466e-6)), V in volts;
- Cs (Å) = cs_mm·1e7;
- K1 = π·λ, K2 = π/2·Cs·λ³, K3 = atan(Q0/sqrt(1 − Q0²)), K4 = −B/4,
  K5 = phase shift in radians;
- Δf(θ) = −(U + V)/2 − (U − V)/2·cos(2(θ − angle));
- χ = K1·Δf·u² + K2·u⁴ − K5 − K3;
- CTF = −sin(χ)·exp(K4·u²).

So CTF(0) = sin(K3) = Q0 (positive) without phase shift, and the low
frequencies of an image keep their sign: protein stays bright. RELION ≥ 3.1
writes K1·Δf·u² as the quadratic form K1·(Axx·x² + 2·Axy·x·y + Ayy·y²) to
allow an anisotropic magnification matrix; with no magnification matrix the
two are identical, and cryo2d has none. RELION's ``scale`` factor (always 1 in
STAR files) is left out.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from cryo2d.particles import CTFParams

__all__ = ["wavelength_angst", "ctf_2d", "ctf_grid"]


def wavelength_angst(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength.

    Parameters
    ----------
    voltage_kv : float or (n,) array
        Acceleration voltage in kV.

    Returns
    -------
    float64 array, same shape as ``voltage_kv``
        Wavelength in Å (0.0197 Å at 300 kV).
    """
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


def _column(values: np.ndarray, n: int, ndim: int, device, dtype) -> Tensor:
    """Length-n parameter as a float64 tensor shaped (n, 1, ..., 1) for broadcasting."""
    arr = np.array(np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)))
    return torch.as_tensor(arr, device=device, dtype=dtype).reshape((n,) + (1,) * ndim)


def ctf_2d(
    freqs: Tensor,
    params: CTFParams,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Phase-contrast transfer function, RELION's ``CTF::getCTF`` convention.

    Parameters
    ----------
    freqs : (..., 2) float tensor
        Spatial frequency (x, y) in 1/Å (any layout: centred grid, rfft
        half-plane or a list of points).
    params : CTFParams
        Length-n arrays: defocus U/V in Å (positive = underfocus), angle of U
        from the x axis in degrees, kV, Cs in mm, amplitude contrast Q0
        (fraction), phase shift in degrees, B-factor in Å², a factor on
        the whole CTF (``amplitude_scale``, RELION's ``_rlnCtfScalefactor``),
        and where the images were phase-flipped (``phase_flipped``, RELION's
        ``_rlnCtfDataArePhaseFlipped``): their CTF is the absolute value.
    device : torch device, optional
        Where to compute; default the device of ``freqs``.
    dtype : torch dtype
        Output dtype (float32 default). The phase χ is evaluated in float64
        and only the result is cast, so large defoci lose no accuracy.

    Returns
    -------
    (n, ...) tensor of ``dtype``
        Unitless CTF, one plane per particle; equals Q0 (times the amplitude
        scale) at zero frequency when the phase shift is 0.
    """
    device = freqs.device if device is None else torch.device(device)
    f = torch.as_tensor(freqs, device=device).to(torch.float64)
    assert f.shape[-1] == 2, "freqs must end in a dimension of 2 (x, y)"
    n = len(params)
    nd = f.ndim - 1
    c = lambda v: _column(v, n, nd, device, torch.float64)  # noqa: E731

    lam = c(wavelength_angst(params.voltage_kv))
    cs_angst = c(np.asarray(params.cs_mm, dtype=np.float64) * 1e7)
    q0 = np.asarray(params.amplitude_contrast, dtype=np.float64)
    k1 = math.pi * lam
    k2 = (math.pi / 2.0) * cs_angst * lam**3
    k3 = c(np.arctan(q0 / np.sqrt(1.0 - q0 * q0)))
    k4 = -c(params.bfactor_angst2) / 4.0
    k5 = c(np.deg2rad(np.asarray(params.phase_shift_deg, dtype=np.float64)))
    du = c(params.defocus_u_angst)
    dv = c(params.defocus_v_angst)
    angle_rad = c(np.deg2rad(np.asarray(params.defocus_angle_deg, dtype=np.float64)))

    x = f[..., 0].unsqueeze(0)
    y = f[..., 1].unsqueeze(0)
    u2 = x * x + y * y
    theta = torch.atan2(y, x)
    defocus_average = -(du + dv) * 0.5
    defocus_deviation = -(du - dv) * 0.5
    deltaf = defocus_average + defocus_deviation * torch.cos(2.0 * (theta - angle_rad))
    chi = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    ctf = -torch.sin(chi) * torch.exp(k4 * u2) * c(params.amplitude_scale)
    flipped = np.asarray(params.phase_flipped) != 0
    if flipped.any():
        ctf = torch.where(c(flipped.astype(np.float64)) > 0, ctf.abs(), ctf)
    return ctf.to(dtype)


def rescale_ctf(params: CTFParams, factor: np.ndarray) -> CTFParams:
    """The CTFs of ``params`` evaluated at frequencies scaled by ``factor``: CTF'(f) = CTF(factor · f).

    For a particle of pixel size p on a grid of pixel size p0, ``factor`` =
    p0 / p: the same grid index is frequency k / (box p), not k / (box p0).
    Defocus and B-factor scale by factor², Cs by factor⁴ (the phase χ and the
    envelope are polynomials in |f|²); angles, phase shift and amplitude are
    unchanged.
    """
    s2 = np.asarray(factor, dtype=np.float64) ** 2
    return dataclasses.replace(
        params,
        defocus_u_angst=params.defocus_u_angst * s2,
        defocus_v_angst=params.defocus_v_angst * s2,
        cs_mm=params.cs_mm * s2 * s2,
        bfactor_angst2=params.bfactor_angst2 * s2,
    )


def envelope_at_nyquist(params: CTFParams, pixel_size_angst: np.ndarray | float) -> np.ndarray:
    """(n,) each particle's B-factor envelope exp(-B s² / 4) at its Nyquist frequency s = 1 / (2 px).

    Above 1 where B < 0: RELION's convention then boosts the high frequencies
    (tilt-series exports store each tilt's dose as a negative B-factor, for a
    damping that this convention does not apply).
    """
    s2 = (0.5 / np.asarray(pixel_size_angst, dtype=np.float64)) ** 2
    with np.errstate(over="ignore"):
        return np.exp(-np.asarray(params.bfactor_angst2, dtype=np.float64) * s2 / 4.0)


#: A note is given when negative B-factors boost the CTF more than this at Nyquist (B = -507 Å² at
#: 1.96 Å per pixel: 3,800x; RELION per-particle B-factors of -50 Å² at 1 Å per pixel: 23x).
CTF_BOOST_NOTE = 100.0


def boost_note(params: CTFParams | None, pixel_size_angst: np.ndarray | float) -> str | None:
    """The one-line note for B-factors that boost the CTF more than ``CTF_BOOST_NOTE`` at Nyquist, else None."""
    if params is None:
        return None
    boost = float(envelope_at_nyquist(params, pixel_size_angst).max(initial=1.0))
    if boost <= CTF_BOOST_NOTE:
        return None
    return (f"note: negative CTF B-factors boost the CTF up to {boost:,.0f}x at Nyquist (exp(-B s^2/4), as "
            "RELION); tilt-series exports store the dose there: drop the column if that is what it holds")


def ctf_grid(
    params: CTFParams,
    box: int,
    pixel_size_angst: float,
    *,
    rfft: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """CTF sampled on the Fourier grid of a ``box``-pixel image.

    Parameters
    ----------
    params : CTFParams
        Length-n CTF parameters (see :func:`ctf_2d`).
    box : int
        Image edge length in pixels.
    pixel_size_angst : float
        Pixel size in Å.
    rfft : bool
        False: centred full grid, zero frequency at index [box//2, box//2]
        (the layout of :func:`cryo2d.fourier.fft2c`). True: the layout of
        ``torch.fft.rfft2`` (not shifted): rows are ``fftfreq(box)`` order
        (zero at row 0), columns are x = 0 .. box//2.
    device : torch device, optional
    dtype : torch dtype

    Returns
    -------
    (n, box, box) or (n, box, box//2 + 1) tensor of ``dtype``
        Indexed [particle, y, x].
    """
    from cryo2d.fourier import freq_grid

    if rfft:
        fy = torch.fft.fftfreq(box, d=float(pixel_size_angst), dtype=torch.float64, device=device)
        fx = torch.fft.rfftfreq(box, d=float(pixel_size_angst), dtype=torch.float64, device=device)
        yy, xx = torch.meshgrid(fy, fx, indexing="ij")
        freqs = torch.stack([xx, yy], dim=-1)
    else:
        freqs = freq_grid(box, pixel_size_angst, device=device, dtype=torch.float64)
    return ctf_2d(freqs, params, device=device, dtype=dtype)
