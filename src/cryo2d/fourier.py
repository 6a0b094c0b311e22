"""Centred FFTs, frequency grids, shells, Fourier crop/pad, shifts and rotations.

Conventions (used by every module of cryo2d):

- Images are ``(..., box, box)`` arrays indexed ``[y, x]``: row = y,
  column = x. The image centre (origin) is pixel ``(box//2, box//2)``.
- "Centred" Fourier arrays have zero frequency at index ``[box//2, box//2]``:
  ``fft2c(img) = fftshift(fft2(ifftshift(img)))``. Element ``[i, j]`` holds
  frequency (x, y) = ((j − box//2)/box, (i − box//2)/box) cycles/px. The
  forward transform is unnormalised (``torch.fft`` "backward" norm), so
  ``fft2c(img)[box//2, box//2] = img.sum()``.
- A rotation by ψ (degrees) maps the point (x, y) relative to the centre to
  (x cosψ − y sinψ, x sinψ + y cosψ): counter-clockwise with x to the right
  and y up (on a display with row 0 at the top it looks clockwise). A
  rotation by +90° equals ``torch.rot90(img, 1, dims=(-1, -2))`` about the
  centre.
- A shift by (sx, sy) px moves content to larger x (column) and y (row)
  indices: ``shift_images(img, [(3, -2)]) == torch.roll(img, (-2, 3), (-2, -1))``.
  In Fourier space it multiplies by exp(−2πi f·s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import Tensor


def _first_vector_math_call() -> None:
    """Make the process's first vectorised math call (sqrt, exp, cos, ...) on one thread.

    In PyTorch's MKL builds, ``torch.sqrt``, ``torch.exp``, ``torch.cos`` and
    the like call MKL's vector math library. When the process's first such
    call is split over threads, one thread's share can come from a less
    accurate code path: measured here, ``torch.sqrt`` of a (48, 48, 48)
    float64 grid after a 3D FFT had every element of its first half off, by
    up to 3·10⁵ ulp (6·10⁻¹¹ relative), in 9 of 16 fresh processes. So the
    same seed gave other bits (the demo's simulated stack, and EM's path from
    it). Any first call on one thread settles it for the process.
    """
    torch.sqrt(torch.ones(1, dtype=torch.float64))


_first_vector_math_call()

__all__ = [
    "fft2c",
    "ifft2c",
    "freq_grid",
    "radius_grid",
    "shell_index",
    "crop_fourier",
    "fft2c_cropped",
    "pad_fourier",
    "resize_images",
    "radial_power_spectrum",
    "shift_phase",
    "shift_images",
    "rotate_images",
]

_DIMS = (-2, -1)


def fft2c(images: Tensor) -> Tensor:
    """Centred 2D FFT of real or complex images.

    Parameters
    ----------
    images : (..., box, box) tensor
        Real-space images indexed [y, x], origin at pixel (box//2, box//2).

    Returns
    -------
    (..., box, box) complex tensor
        Unnormalised transform, zero frequency at index [box//2, box//2].
    """
    shifted = torch.fft.ifftshift(images, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=_DIMS), dim=_DIMS)


def ifft2c(F: Tensor, *, real: bool = False) -> Tensor:
    """Inverse of :func:`fft2c`.

    Parameters
    ----------
    F : (..., box, box) complex tensor
        Centred transform, zero frequency at index [box//2, box//2].
    real : bool
        Return the real part only (for transforms of real images).

    Returns
    -------
    (..., box, box) complex tensor, or real when ``real=True``
        Images indexed [y, x], origin at pixel (box//2, box//2).
    """
    shifted = torch.fft.ifftshift(F, dim=_DIMS)
    out = torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_DIMS), dim=_DIMS)
    return out.real if real else out


def _centred_coords(box: int, device=None, dtype=torch.float32) -> Tensor:
    """(box,) pixel offsets from the centre: −box//2 .. (box−1)//2."""
    return torch.arange(box, device=device, dtype=dtype) - (box // 2)


def freq_grid(
    box: int,
    pixel_size_angst: float | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Spatial frequencies of a centred Fourier grid.

    Parameters
    ----------
    box : int
        Edge length in pixels.
    pixel_size_angst : float, optional
        Pixel size in Å. None: frequencies in cycles/px; else in 1/Å.

    Returns
    -------
    (box, box, 2) tensor
        ``[..., 0]`` = x, ``[..., 1]`` = y frequency at each [row, column];
        zero at index [box//2, box//2], −0.5 cycles/px at index 0 for even box.
    """
    step = 1.0 / box if pixel_size_angst is None else 1.0 / (box * float(pixel_size_angst))
    k = _centred_coords(box, device=device, dtype=dtype) * step
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def radius_grid(
    box: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Distance of each pixel from the centre (box//2, box//2).

    Serves both spaces: in real space it is the radius in px, on a centred
    Fourier grid it is the frequency radius in units of 1/box cycles/px
    (Fourier pixels).

    Returns
    -------
    (box, box) float tensor
    """
    k = _centred_coords(box, device=device, dtype=dtype)
    return torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)


def shell_index(box: int, *, device: torch.device | str | None = None) -> Tensor:
    """Fourier shell of each element of a centred grid: the rounded radius.

    Returns
    -------
    (box, box) int64 tensor
        Shell 0 is the zero frequency; shells 0..box//2 are complete circles
        (box//2 is Nyquist); the corners reach about box/√2.
    """
    return torch.round(radius_grid(box, device=device, dtype=torch.float64)).to(torch.int64)


def crop_fourier(F: Tensor, new_box: int) -> Tensor:
    """Keep the central ``new_box`` × ``new_box`` frequencies of a centred transform.

    Parameters
    ----------
    F : (..., box, box) tensor
        Centred transform (zero frequency at [box//2, box//2]).
    new_box : int
        New edge length, ≤ box.

    Returns
    -------
    (..., new_box, new_box) tensor
        Zero frequency at [new_box//2, new_box//2]; same frequency spacing.
    """
    box = F.shape[-1]
    assert new_box <= box, "crop_fourier: new_box must not exceed box"
    start = box // 2 - new_box // 2
    return F[..., start : start + new_box, start : start + new_box]


def fft2c_cropped(images: Tensor, new_box: int) -> Tensor:
    """``crop_fourier(fft2c(images), new_box)`` for real images, from their real FFT.

    The kept frequencies are gathered from the x ≥ 0 half of the transform
    (the others are conjugates of their mirrors) and given the phase that
    centring the image adds, exp(+2πi k·c / box) with c = box//2: no shifted
    copies of the images or of their whole transforms (1,000 images of
    256 px cropped to 126 px: 1.3 -> 0.4 s).

    Parameters
    ----------
    images : (..., box, box) real tensor
    new_box : int
        Edge of the kept centred transform, ≤ box.

    Returns
    -------
    (..., new_box, new_box) complex tensor
        The same values as ``crop_fourier(fft2c(images), new_box)`` to float rounding.
    """
    box = images.shape[-1]
    assert new_box <= box, "fft2c_cropped: new_box must not exceed box"
    dev = images.device
    k = torch.arange(new_box, device=dev) - new_box // 2
    ky, kx = k[:, None], k[None, :]
    mirrored = (kx < 0).expand(new_box, new_box)
    row = torch.where(mirrored, -ky, ky) % box
    col = torch.where(mirrored, -kx, kx)
    R = torch.fft.rfft2(images)
    F = R.flatten(-2)[..., (row * R.shape[-1] + col).flatten()].unflatten(-1, (new_box, new_box))
    F = torch.where(mirrored, F.conj(), F)
    c = box // 2
    phase = torch.polar(torch.ones(new_box, new_box, device=dev, dtype=torch.float64),
                        (2 * math.pi * c / box) * (kx + ky).double()).to(F.dtype)
    return F * phase


def pad_fourier(F: Tensor, new_box: int) -> Tensor:
    """Zero-pad a centred transform to ``new_box`` (inverse of :func:`crop_fourier`).

    Parameters
    ----------
    F : (..., box, box) tensor
        Centred transform.
    new_box : int
        New edge length, ≥ box.

    Returns
    -------
    (..., new_box, new_box) tensor
        Zero frequency at [new_box//2, new_box//2]; the new frequencies are 0.
    """
    box = F.shape[-1]
    assert new_box >= box, "pad_fourier: new_box must not be smaller than box"
    out = F.new_zeros(F.shape[:-2] + (new_box, new_box))
    start = new_box // 2 - box // 2
    out[..., start : start + box, start : start + box] = F
    return out


def resize_images(images: Tensor, new_box: int) -> Tensor:
    """Resample real images to ``new_box`` pixels by Fourier crop or zero-pad.

    The field of view is kept, so the pixel size changes by box/new_box.
    Pixel values keep their scale (the mean is preserved).

    Parameters
    ----------
    images : (..., box, box) real tensor
    new_box : int

    Returns
    -------
    (..., new_box, new_box) real tensor, same dtype
    """
    box = images.shape[-1]
    if new_box == box:
        return images.clone()
    F = fft2c(images)
    F = crop_fourier(F, new_box) if new_box < box else pad_fourier(F, new_box)
    out = ifft2c(F, real=True) * (new_box / box) ** 2
    return out.to(images.dtype)


def radial_power_spectrum(images: Tensor) -> Tensor:
    """Mean power per Fourier shell.

    Power is |F|²/box² with F = :func:`fft2c` (images), so white noise of
    variance σ² has power σ² in every shell.

    Parameters
    ----------
    images : (n, box, box) real tensor

    Returns
    -------
    (n, box//2 + 1) float tensor
        Shells 0 (zero frequency) .. box//2 (Nyquist); corner frequencies
        beyond Nyquist are left out.
    """
    box = images.shape[-1]
    power = (fft2c(images).abs() ** 2 / box**2).reshape(images.shape[0], -1)
    shells = shell_index(box, device=images.device).reshape(-1)
    keep = shells <= box // 2
    power, shells = power[:, keep], shells[keep]
    n_shells = box // 2 + 1
    sums = power.new_zeros(images.shape[0], n_shells).index_add_(1, shells, power)
    counts = torch.bincount(shells, minlength=n_shells).to(power.dtype)
    return sums / counts


def shift_phase(freqs_px: Tensor, shifts_px: Tensor) -> Tensor:
    """Fourier phase factors of real-space shifts.

    Parameters
    ----------
    freqs_px : (m, 2) float tensor
        Frequencies (x, y) in cycles/px.
    shifts_px : (t, 2) float tensor
        Shifts (sx, sy) in px; content moves to larger x and y.

    Returns
    -------
    (t, m) complex tensor
        exp(−2πi f·s); multiply a centred transform by it to shift the image.
    """
    phase = -2.0 * math.pi * (shifts_px.to(freqs_px.dtype) @ freqs_px.T)
    return torch.polar(torch.ones_like(phase), phase)


def shift_images(images: Tensor, shifts_px: Tensor) -> Tensor:
    """Sub-pixel shift of real images by Fourier phase (periodic, wraps around).

    Parameters
    ----------
    images : (n, box, box) real tensor
    shifts_px : (n, 2) float tensor
        (sx, sy) in px per image; content moves to larger column (x) and
        row (y) indices. Integer shifts equal ``torch.roll``.

    Returns
    -------
    (n, box, box) real tensor, same dtype
    """
    n, box = images.shape[0], images.shape[-1]
    shifts = torch.as_tensor(shifts_px, device=images.device, dtype=torch.float64).reshape(n, 2)
    freqs = freq_grid(box, device=images.device, dtype=torch.float64).reshape(-1, 2)
    phase = -2.0 * math.pi * (shifts @ freqs.T)  # (n, box*box), one shift per image
    factor = torch.polar(torch.ones_like(phase), phase).reshape(n, box, box)
    F = fft2c(images.to(torch.float64)) * factor
    return ifft2c(F, real=True).to(images.dtype)


def rotate_images(images: Tensor, angles_deg: Tensor, *, mode: str = "bicubic") -> Tensor:
    """Real-space rotation about the centre pixel (box//2, box//2).

    The point (x, y) relative to the centre goes to (x cosψ − y sinψ,
    x sinψ + y cosψ); pixels whose source lies outside the image are 0.

    Parameters
    ----------
    images : (n, box, box) real tensor
    angles_deg : (n,) float tensor or sequence
        ψ in degrees, one per image.
    mode : {"bicubic", "bilinear", "nearest"}
        ``torch.nn.functional.grid_sample`` interpolation.

    Returns
    -------
    (n, box, box) real tensor, same dtype
    """
    n, box = images.shape[0], images.shape[-1]
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    psi = torch.deg2rad(torch.as_tensor(angles_deg, device=images.device, dtype=torch.float64)).reshape(n)
    c, s = torch.cos(psi)[:, None, None], torch.sin(psi)[:, None, None]
    k = _centred_coords(box, device=images.device, dtype=torch.float64)
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    # output(p) = input(R(-psi) p)
    x_src = c * xx + s * yy + box // 2
    y_src = -s * xx + c * yy + box // 2
    scale = 2.0 / (box - 1)  # align_corners=True: pixel index 0 -> -1, box-1 -> +1
    grid = torch.stack([x_src * scale - 1.0, y_src * scale - 1.0], dim=-1).to(dtype)
    out = nnf.grid_sample(
        images.to(dtype)[:, None], grid, mode=mode, padding_mode="zeros", align_corners=True
    )
    return out[:, 0].to(images.dtype)
