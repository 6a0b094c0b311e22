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

:func:`contrast_z` measures the sign from the data. At zero frequency the CTF
is the amplitude contrast, positive whatever the defocus (RELION's
convention, ours), so a particle adds amplitude contrast × its mass to the
image's total: above the background for bright protein, below it for dark,
whatever the particle's shape. Each image, normalised as the engine
normalises it (background beyond 0.45 box: mean 0, SD 1), gives the mean of
its disc within ``CONTRAST_RADIUS`` box of the centre; z is the t statistic of
those means over up to ``CONTRAST_IMAGES`` images spread evenly over the set.
A first form, the centre minus a ring around it of CTF-filtered images, read
hollow particles that nearly fill the box (a shell of radius 0.41 box) as dark
(z = -50): their rim lies in the ring.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cryo2d.particles import ParticleSet

#: Images read to measure the contrast (evenly spread over the set).
CONTRAST_IMAGES = 1000
#: Bytes of images read for the measure at most (256 px: 250 images), unless fewer than 250 images.
CONTRAST_BYTES = 64 * 2**20
#: Radius of the disc whose mean is measured, in boxes.
CONTRAST_RADIUS = 0.3
#: Below this z the particles look dark: inverted unless the user says otherwise.
#: Bright sets: +8.8 for 17 real 80S ribosome images extracted by RELION (ASPIRE's
#: sample), +0.9 for 5 real images (cryoDRGN's RELION 3.1 sample); 1,000 simulated
#: images of 48-64 px score +8 (40 % junk) to +27 (SNR 0.05-0.1), hollow shells and
#: rings of radius 0.2-0.4 box +21 to +37, 250 of 256 px +14; the 48 px `small`
#: set +23.9 and the same images negated -23.9 (session 39).
DARK_Z = -5.0
_CHUNK = 256  # images read at a time


def contrast_z(particles: ParticleSet, n_images: int = CONTRAST_IMAGES) -> tuple[float, int]:
    """How bright the particles are against their background: (z, images used); z > 0 for bright protein.

    Parameters
    ----------
    particles : ParticleSet
        With opened stacks.
    n_images : int
        At most this many images (and at most ``CONTRAST_BYTES`` of them, but
        at least 250), evenly spread over the set.

    Returns
    -------
    (float, int)
        The t statistic, over the images, of each normalised image's mean
        within ``CONTRAST_RADIUS`` box of its centre; 0.0 when it cannot be
        told (fewer than two images, or no spread).
    """
    from cryo2d.em.data import normalise_images
    from cryo2d.fourier import radius_grid

    n, box = len(particles), particles.box
    n_images = min(n_images, max(250, int(CONTRAST_BYTES // (4 * box * box))))
    rows = np.unique(np.linspace(0, n - 1, min(n, n_images)).round().astype(np.int64))
    disc = radius_grid(box) < CONTRAST_RADIUS * box
    means = []
    for start in range(0, len(rows), _CHUNK):
        images = normalise_images(torch.from_numpy(particles.stack.read(rows[start:start + _CHUNK])), 0.45 * box)
        means.append(images[:, disc].double().mean(dim=1).numpy())
    d = np.concatenate(means)
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

    ``invert``: True inverts (and says so when the particles look bright
    already: z above ``-DARK_Z``), False keeps the images as they are, None
    (auto) inverts when :func:`contrast_z` is below ``DARK_Z`` and says so.
    """
    if invert is False:
        return particles, None
    z, m = contrast_z(particles)
    if invert is True:
        return invert_contrast(particles), None if z <= -DARK_Z else (
            f"--invert-contrast: the particles look bright on a dark background already (contrast z = {z:.1f} "
            f"over {m} images; dark protein scores below {DARK_Z:g}): inverted, the protein is dark and so are "
            "the classes (leave the option out to keep the images as they are)"
        )
    if z >= DARK_Z:
        return particles, None
    return invert_contrast(particles), (
        f"the particles look dark on a light background (contrast z = {z:.1f} over {m} images; "
        "bright protein scores above 0): inverted, as --invert-contrast does (--no-invert-contrast keeps them)"
    )
