"""The particles' contrast: bright protein on a dark background, or the reverse.

RELION's particle stacks hold the protein bright (its extraction inverts the
micrographs' contrast); CryoSPARC's hold it as cut from the micrographs, dark,
with ``blob/sign`` = -1 to say so (the ``.cs`` reader multiplies by it). The
engine needs bright protein: its class masks keep the density above a
fraction of the class's maximum and its re-centring weighs the density above
a threshold. A stack extracted without inversion, with nothing in the
metadata to say so, gives classes of nothing: the 48 px ``small`` set
negated scores purity 0.31 and median NCC 0.20 against 0.85 and 0.995
(seed 0; benchmarks/README.md, session 39). RELION's likelihood does not care
about the sign, but its class averages then come out dark.

:func:`contrast_z` measures the sign from the data. Each image, normalised
as the engine normalises it, is filtered by its own CTF and low-passed
(``CONTRAST_RES_ANGST``): the CTF-weighted sum that a class average is made of,
one image at a time, whatever the CTF's phase at each frequency. Its mean
within 0.2 box of the centre minus its mean 0.3-0.45 box from it is positive
for bright protein picked near the box centre, negative for dark. The z is
the t statistic of that difference over up to ``CONTRAST_IMAGES`` images
spread evenly over the set (fewer for large boxes: ``CONTRAST_BYTES``), in
0.05-0.6 s.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from cryo2d.particles import ParticleSet

#: Images read to measure the contrast (evenly spread over the set).
CONTRAST_IMAGES = 1000
#: Bytes of images read for the measure at most (256 px: 250 images), unless fewer than 250 images.
CONTRAST_BYTES = 64 * 2**20
#: Low-pass of the images for the measure, Å.
CONTRAST_RES_ANGST = 20.0
#: Below this z the particles look dark: inverted unless the user says otherwise.
#: Bright sets: +6.8 for 17 real 80S ribosome images extracted by RELION (ASPIRE's
#: sample), +1.9 for 5 real images (cryoDRGN's RELION 3.1 sample); 1,000 simulated
#: images of 48-64 px score +15 to +56 (SNR 0.05-0.1, 10-40 % junk), 250 of 256 px
#: at SNR 0.05 +22, the 48 px `small` set +39.7 and the same images negated -39.7
#: (session 39).
DARK_Z = -5.0
_CHUNK = 256  # images read and filtered at a time


def contrast_z(particles: ParticleSet, n_images: int = CONTRAST_IMAGES, res_angst: float = CONTRAST_RES_ANGST) -> tuple[float, int]:
    """How bright the particles' centres are: (z, images used); z > 0 for bright protein.

    Parameters
    ----------
    particles : ParticleSet
        With opened stacks; its CTF is used when it has one (``--no-ctf``: none).
    n_images : int
        At most this many images (and at most ``CONTRAST_BYTES`` of them, but
        at least 250), evenly spread over the set.
    res_angst : float
        Low-pass of the filtered images, Å.

    Returns
    -------
    (float, int)
        The t statistic, over the images, of (mean within 0.2 box of the
        centre − mean 0.3-0.45 box from it) of each image filtered by its
        CTF up to ``res_angst``; 0.0 when it cannot be told (fewer than two
        images, or no spread). The filtered images are made on the smallest
        grid that holds the low-pass (the same frequency spacing).
    """
    from cryo2d.ctf import ctf_grid
    from cryo2d.em.data import normalise_images
    from cryo2d.fourier import fft2c_cropped, freq_grid, ifft2c

    n, box = len(particles), particles.box
    n_images = min(n_images, max(250, int(CONTRAST_BYTES // (4 * box * box))))
    rows = np.unique(np.linspace(0, n - 1, min(n, n_images)).round().astype(np.int64))
    pixel = float(np.median(particles.pixel_size_angst))
    small = min(box, 2 * math.ceil(box * pixel / res_angst) + 2)
    small_pixel = pixel * box / small  # the same frequency spacing, 1 / (box · pixel)
    low = freq_grid(small, small_pixel).norm(dim=-1) <= 1.0 / res_angst
    r = np.hypot(*np.meshgrid(np.arange(small) - small // 2, np.arange(small) - small // 2, indexing="ij")) / small
    inner = torch.from_numpy(r < 0.2)
    ring = torch.from_numpy((r > 0.3) & (r < 0.45))
    diffs = []
    for start in range(0, len(rows), _CHUNK):
        part = rows[start:start + _CHUNK]
        images = normalise_images(torch.from_numpy(particles.stack.read(part)), 0.45 * box)
        F = fft2c_cropped(images, small) * low
        if particles.ctf is not None:
            F = F * ctf_grid(particles.ctf.subset(part), small, small_pixel)
        filtered = ifft2c(F, real=True)
        diffs.append((filtered[:, inner].mean(dim=1) - filtered[:, ring].mean(dim=1)).double().numpy())
    d = np.concatenate(diffs)
    spread = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    if spread <= 0:
        return 0.0, len(d)
    return float(d.mean() / (spread / np.sqrt(len(d)))), len(d)


def invert_contrast(particles: ParticleSet) -> ParticleSet:
    """``particles`` with their images read multiplied by -1 (``extra["contrast_inverted"]`` toggled)."""
    extra = dict(particles.extra)
    extra["contrast_inverted"] = not extra.get("contrast_inverted", False)
    return dataclasses.replace(particles, stack=particles.stack.inverted(), extra=extra)


def settle_contrast(particles: ParticleSet, invert: bool | None) -> tuple[ParticleSet, str | None]:
    """The particles as the engine should see them, and a note for the user (or None).

    ``invert``: True inverts, False keeps the images as they are, None
    (auto) inverts when :func:`contrast_z` is below ``DARK_Z`` and says so.
    """
    if invert is True:
        return invert_contrast(particles), None
    if invert is False:
        return particles, None
    z, m = contrast_z(particles)
    if z >= DARK_Z:
        return particles, None
    return invert_contrast(particles), (
        f"the particles look dark on a light background (contrast z = {z:.1f} over {m} images; "
        "bright protein scores above 0): inverted, as --invert-contrast does (--no-invert-contrast keeps them)"
    )
