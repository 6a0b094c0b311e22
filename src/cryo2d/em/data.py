"""Reading particle batches and putting them on the working Fourier grid."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import numpy as np
import torch
from torch import Tensor

from cryo2d.ctf import ctf_2d, rescale_ctf
from cryo2d.em.geometry import Geometry
from cryo2d.fourier import fft2c, fft2c_cropped, freq_grid, radius_grid
from cryo2d.particles import ParticleSet


def normalise_images(images: Tensor, background_radius_px: float) -> Tensor:
    """RELION-style normalisation: background (outside the radius) mean 0, std 1.

    Parameters
    ----------
    images : (b, box, box) float tensor
    background_radius_px : float
        Pixels farther than this from the centre are background.

    Returns
    -------
    (b, box, box) float tensor
    """
    bg = radius_grid(images.shape[-1], device=images.device) > background_radius_px
    vals = images[:, bg]
    mean = vals.mean(dim=1)
    std = vals.std(dim=1).clamp(min=1e-6)
    return (images - mean[:, None, None]) / std[:, None, None]


def _libc():
    """glibc's C library (None on other C libraries and systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # musl and others lack these
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
#: Trim the heap once resident memory has grown this much past its working level.
TRIM_GROWTH_BYTES = 256 << 20
_working_rss: list[int] = []  # resident bytes at the first call after a trim (empty: trim)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def tune_allocator() -> None:
    """Make glibc keep freed E-step intermediates in its heap for reuse (no-op elsewhere).

    An E-step chunk allocates and frees intermediates of up to about 100 MB.
    Above glibc's mmap threshold (at most 32 MB by default) each one is a
    fresh mapping whose pages the kernel faults in and zeroes, and every
    automatic or explicit trim does the same to the heap: on the 64 px,
    K = 20 set a third of the CPU time went to the kernel that way
    (benchmarks/README.md, Where the time goes). With both thresholds at
    1 GB the memory is reused; :func:`release_free_heap` bounds what the
    heap keeps. Process-wide; called by the engine when it starts.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def release_free_heap() -> None:
    """Give the heap's free pages back (glibc ``malloc_trim(0)``) once it has grown.

    The small per-chunk results kept until the end of a pass sit between
    the holes the chunks' intermediates leave, so the heap grows: without
    trimming, resident memory grew by about 80 kB per particle of a full
    pass (128 px, K = 50) and never came down. Trimming faults the pages in
    again at the next chunk, so it is done only when resident memory is
    :data:`TRIM_GROWTH_BYTES` above its working level (measured at the
    first call after a trim, when the heap holds one chunk's freed
    intermediates). Called once per batch read; no-op on other C libraries.
    """
    if _LIBC is None:
        return
    rss = _rss_bytes()
    if rss is not None and not _working_rss:
        _working_rss.append(rss)
    elif rss is None or rss > _working_rss[0] + TRIM_GROWTH_BYTES:
        _LIBC.malloc_trim(0)
        _working_rss.clear()


def load_batch(particles: ParticleSet, idx: np.ndarray, geom: Geometry, device) -> Tensor:
    """Particles ``idx`` as centred transforms on the working grid.

    Releases the free heap first if it has grown (:func:`release_free_heap`):
    the batches of a pass read one after another, so this bounds its
    resident memory.

    Returns
    -------
    (b, work_box, work_box) complex64 tensor
        Unnormalised centred FFT of the normalised input images, cropped to
        the working box (same frequency spacing as the input), each shifted
        by minus its ``particles.prior_shift_px`` (centred) when the set has them.
    """
    release_free_heap()
    idx = np.asarray(idx)
    images = torch.from_numpy(np.ascontiguousarray(particles.stack.read(idx), dtype=np.float32))
    images = normalise_images(images.to(device), 0.45 * geom.box)
    F = fft2c_cropped(images, geom.work_box)
    if particles.prior_shift_px is not None:
        along_y, along_x = centring_factors(particles.prior_shift_px[idx], geom.box, geom.work_box, device)
        F.mul_(along_y[:, :, None]).mul_(along_x[:, None, :])
    return F


def centring_factors(shifts_px: np.ndarray, box: int, work_box: int, device) -> tuple[Tensor, Tensor]:
    """Phases along y and along x, (b, work_box) complex64 each, that move each image by ``-shifts_px``.

    A centred transform cropped from a ``box`` px image to ``work_box``,
    multiplied by ``along_y[:, :, None] * along_x[:, None, :]``, undoes a
    shift of the content by ``shifts_px`` ((b, 2) px of the input box, x
    then y), as ``fourier.shift_images`` by the opposite shift would: the
    factor exp(2πi (f_x s_x + f_y s_y)), f in cycles per input pixel, is the
    product of one phase along each axis. Applied one axis after the other,
    in place, it costs two passes over the transform (1,000 images of 256 px cropped to 126 px:
    0.017 s, against 0.13 s for the product made first; benchmarks/README.md).
    """
    f = (torch.arange(work_box, dtype=torch.float64, device=device) - work_box // 2) / box  # cycles/px
    s = torch.as_tensor(shifts_px, dtype=torch.float64, device=device).reshape(-1, 2)
    along_x, along_y = (torch.polar(torch.ones_like(a), a).to(torch.complex64)
                        for a in (2 * np.pi * s[:, j:j + 1] * f for j in (0, 1)))
    return along_y, along_x


#: Memory for :class:`PointCache` (bytes): 64 px, 20,000 particles fit, with their CTFs.
POINT_CACHE_BYTES = 384 * 2**20


class PointCache:
    """Particles' transforms (and CTFs) at fixed Fourier points, kept for the run up to a memory budget.

    A run reads each particle many times (every online batch that draws it,
    every full pass). Reading, normalising, transforming and cropping it
    again each time took 2 s of the 35 s `peer` job (3,000 x 64 px, K = 20),
    and its CTF 3 % of a 96 px pass. The first ``capacity`` distinct
    particles read (``budget_bytes`` / 12 bytes per point with a CTF, 8
    without) are kept; the others are read from the stack each time. The
    values are those :func:`load_batch` and :func:`batch_ctf` give, so a
    run gives the same classes with or without the cache.

    Parameters
    ----------
    particles : ParticleSet
    geom : Geometry
    flat : (m,) int64 tensor
        Flat indices into the ``work_box`` x ``work_box`` centred grid.
    device : torch device
    budget_bytes : int
    use_ctf : bool
        Whether :meth:`read_with_ctf` gives the particles' CTFs (else ones).
    """

    def __init__(self, particles: ParticleSet, geom: Geometry, flat: Tensor, device, budget_bytes: int = POINT_CACHE_BYTES,
                 use_ctf: bool = False) -> None:
        self.particles, self.geom, self.flat, self.device, self.use_ctf = particles, geom, flat, device, use_ctf
        per_point = 12 if use_ctf else 8
        self.capacity = int(min(len(particles), budget_bytes // (per_point * max(1, len(flat)))))
        self.slot = np.full(len(particles), -1, dtype=np.int64)  # row in ``values``, -1 = not kept
        self.used = 0
        self.values: Tensor | None = None
        self.ctf_values: Tensor | None = None

    def read_with_ctf(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """(b, m) complex64 transforms and (b, m) float32 CTFs of particles ``idx`` at the points."""
        idx = np.asarray(idx)
        slots = self.slot[idx]
        miss = slots < 0
        if not miss.any():
            at = torch.from_numpy(slots).to(self.device)
            return self.values[at], self._ctf_rows(at, idx)
        fresh = load_batch(self.particles, idx[miss], self.geom, self.device).flatten(1)[:, self.flat]
        fresh_ctf = batch_ctf(self.particles, idx[miss], self.geom, self.use_ctf, self.device, flat=self.flat)
        if miss.all():
            out, out_ctf = fresh, fresh_ctf
        else:
            out = torch.empty((len(idx), len(self.flat)), dtype=fresh.dtype, device=self.device)
            out_ctf = torch.empty((len(idx), len(self.flat)), dtype=fresh_ctf.dtype, device=self.device)
            new_rows = torch.from_numpy(np.nonzero(miss)[0]).to(self.device)
            out[new_rows], out_ctf[new_rows] = fresh, fresh_ctf
            hit = np.nonzero(~miss)[0]
            at = torch.from_numpy(slots[hit]).to(self.device)
            hit_rows = torch.from_numpy(hit).to(self.device)
            out[hit_rows], out_ctf[hit_rows] = self.values[at], self._ctf_rows(at, idx[hit])
        self.keep(idx[miss], fresh, fresh_ctf)
        return out, out_ctf

    def keep(self, idx: np.ndarray, values: Tensor, ctf: Tensor) -> None:
        """Keep particles ``idx`` read elsewhere, while there is room: (b, m) ``values`` and ``ctf``
        at the cache's points, as :func:`load_batch` and :func:`batch_ctf` give them. Particles
        already kept, and repeats after the first, are skipped."""
        room = self.capacity - self.used
        if room <= 0:
            return
        idx = np.asarray(idx)
        if self.values is None:
            self.values = torch.empty((self.capacity, len(self.flat)), dtype=values.dtype, device=self.device)
            if self.use_ctf:
                self.ctf_values = torch.empty((self.capacity, len(self.flat)), dtype=ctf.dtype, device=self.device)
        _, first = np.unique(idx, return_index=True)  # each particle once
        first = np.sort(first[self.slot[idx[first]] < 0])[:room]
        take = torch.from_numpy(first).to(self.device)
        rows = torch.arange(self.used, self.used + len(take), device=self.device)
        self.values[rows] = values[take]
        if self.use_ctf:
            self.ctf_values[rows] = ctf[take]
        self.slot[idx[first]] = rows.cpu().numpy()
        self.used += len(take)

    def _ctf_rows(self, at: Tensor, idx: np.ndarray) -> Tensor:
        """The kept CTFs in rows ``at`` (ones without CTF) for particles ``idx``."""
        if self.use_ctf:
            return self.ctf_values[at]
        return torch.ones((len(idx), len(self.flat)), device=self.device)


def batch_ctf(particles: ParticleSet, idx: np.ndarray, geom: Geometry, use_ctf: bool, device, flat: Tensor | None = None) -> Tensor:
    """CTF of particles ``idx`` on the centred working grid, (b, work_box, work_box) float32 (ones without CTF).

    With ``flat`` (indices into the flattened grid), only at those points: (b, len(flat)).
    A particle whose pixel size is not the run's (``geom.pixel_size_angst``) has its
    CTF at its own frequencies, k / (box · its pixel size) (:func:`cryo2d.ctf.rescale_ctf`).
    """
    b = len(idx)
    shape = (b, geom.work_box, geom.work_box) if flat is None else (b, len(flat))
    if not use_ctf:
        return torch.ones(shape, device=device)
    freqs = freq_grid(geom.work_box, geom.work_pixel_angst, device=device)
    if flat is not None:
        freqs = freqs.reshape(-1, 2)[flat]
    idx = np.asarray(idx)
    params = particles.ctf.subset(idx)
    pixel = np.asarray(particles.pixel_size_angst, dtype=np.float64)[idx]
    if (pixel != geom.pixel_size_angst).any():  # optics groups a little apart: each at its own frequencies
        params = rescale_ctf(params, geom.pixel_size_angst / pixel)
    return ctf_2d(freqs, params, device=device)


def noise_spectrum(X: Tensor, geom: Geometry, n_shells: int) -> Tensor:
    """Initial noise power per shell from the background of the images.

    The images are masked to the region outside the particle (the mask's
    outer radius, or the corners when no mask was given) with a soft edge,
    and the power spectrum of what remains is divided by the fraction of the
    box it covers.

    Parameters
    ----------
    X : (b, work_box, work_box) complex tensor
        Working-grid transforms.

    Returns
    -------
    (n_shells,) float tensor of mean |noise(f)|² per shell.
    """
    from cryo2d.em.geometry import soft_mask
    from cryo2d.fourier import ifft2c, shell_index

    bwork = geom.work_box
    inner = min(geom.mask_outer_px, 0.45 * bwork)
    bg = 1.0 - soft_mask(bwork, inner, inner + 2.0, device=X.device)
    images = ifft2c(X, real=True)
    Fb = fft2c(images * bg)
    frac = float((bg * bg).mean())
    power = (Fb.abs() ** 2).mean(dim=0) / max(frac, 1e-3)
    shells = shell_index(bwork, device=X.device)
    out = torch.zeros(n_shells, device=X.device)
    cnt = torch.zeros(n_shells, device=X.device)
    keep = shells < n_shells
    out.index_add_(0, shells[keep], power[keep])
    cnt.index_add_(0, shells[keep], torch.ones_like(power[keep]))
    return out / cnt.clamp(min=1)
