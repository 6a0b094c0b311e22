"""After the last iteration: sort classes, align filaments, drop duplicate picks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf

from cryo2d.em.geometry import soft_mask
from cryo2d.fourier import fft2c, resize_images, rotate_images


def sort_order(counts: np.ndarray) -> np.ndarray:
    """Class order largest first (stable for ties): ``new -> old`` index array."""
    return np.argsort(-np.asarray(counts), kind="stable")


_AXIS_BOX = 64  # px: larger classes are resized to this for the axis search (the axis is a low-resolution feature)
_AXIS_STEP_DEG = 1.0
_AXIS_CHUNK = 32  # classes at a time: 32 of 512 px take 67 MB in complex64 while resized


def vertical_rotation_deg(classes: np.ndarray) -> np.ndarray:
    """Per class, the in-plane turn that puts its long axis along y, degrees as :func:`rotate_images` turns.

    The long axis is the direction along which the class projects most
    sharply: turned by the angle and summed along y within a soft disc of
    radius 0.45 box (background level removed), the class's profile across x
    has its largest variance. A rod then projects to its narrow
    cross-section, and so does a filament that crosses the whole box. By the
    Fourier-slice theorem that variance is the power on the central line of
    the class's transform at minus the angle, so it is read from one
    (2x zero-padded) power spectrum per class at 1° steps over [0°, 180°),
    and refined by a parabola through the best angle and its two neighbours.
    Classes over 64 px are resized to 64 px first, 32 at a time.

    The second moments of the bright pixels (above 20 % of the maximum),
    used before, follow the brightest edges instead of the axis: on the
    projections of tilted filament segments, whose edges are brighter at
    opposite ends, they left the three largest classes of a microtubule set
    6-13° off vertical (benchmarks/README.md, session 46).

    Parameters
    ----------
    classes : (K, box, box) array

    Returns
    -------
    (K,) float64 in [0, 180): 0 for a class that is flat within the disc.
    """
    classes = np.asarray(classes, dtype=np.float32)
    return np.concatenate([_vertical_rotation_deg(torch.from_numpy(classes[i : i + _AXIS_CHUNK]))
                           for i in range(0, len(classes), _AXIS_CHUNK)] or [np.zeros(0)])


def _vertical_rotation_deg(x: torch.Tensor) -> np.ndarray:
    """:func:`vertical_rotation_deg` of (k, box, box) float32 classes."""
    if x.shape[-1] > _AXIS_BOX:
        x = resize_images(x, _AXIS_BOX)
    x = x.double()
    b = x.shape[-1]
    disc = soft_mask(b, 0.45 * b - 2.0, 0.45 * b).double()
    x = (x - (x * disc).sum(dim=(-2, -1), keepdim=True) / disc.sum()) * disc
    pad, before = 2 * b, b - b // 2  # the centre pixel b//2 goes to pad//2
    power = fft2c(nnf.pad(x, (before, pad - b - before, before, pad - b - before))).abs() ** 2
    angles = torch.arange(0.0, 180.0, _AXIS_STEP_DEG, dtype=torch.float64)
    theta = torch.deg2rad(-angles)[:, None]
    radius = torch.arange(1.0, b, dtype=torch.float64)[None]  # the padded transform's Fourier px, below Nyquist
    grid = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=-1)  # (angles, radii, (x, y))
    grid = (grid + pad // 2) * (2.0 / (pad - 1)) - 1.0
    line = nnf.grid_sample(power[:, None], grid.expand(len(x), -1, -1, -1), mode="bilinear", align_corners=True)
    var = line[:, 0].sum(dim=-1)  # (k, angles)
    n = len(angles)
    best = var.argmax(dim=1)
    lo, mid, hi = (var.gather(1, ((best + d) % n)[:, None])[:, 0] for d in (-1, 0, 1))
    curve = lo - 2 * mid + hi
    offset = torch.where(curve < 0, 0.5 * (lo - hi) / torch.where(curve < 0, curve, -1.0), 0.0)
    return ((best + offset) * _AXIS_STEP_DEG).numpy() % 180.0


def align_vertical(
    classes: np.ndarray, psi_deg: np.ndarray, class_index: np.ndarray, also: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rotate each class so its long axis is vertical (along y); update particle angles.

    A particle is ``shift(rotate(class, ψ))``; rotating a class by φ makes
    its particles' angles ψ − φ. ``also`` (K, box, box), e.g. the unmasked
    averages, is rotated by the same angles.

    Returns
    -------
    classes : (K, box, box) float32, psi_deg : (n,) float64
    also : (K, box, box) float32 rotated copy of ``also``, or None without it.
    """
    phi = vertical_rotation_deg(classes)
    angles = torch.from_numpy(phi).float()
    rotated = rotate_images(torch.from_numpy(np.asarray(classes, dtype=np.float32)), angles)
    new_psi = np.asarray(psi_deg, dtype=np.float64).copy()
    assigned = class_index >= 0
    new_psi[assigned] = (new_psi[assigned] - phi[class_index[assigned]]) % 360.0
    if also is not None:
        also = rotate_images(torch.from_numpy(np.asarray(also, dtype=np.float32)), angles).numpy()
    return rotated.numpy(), new_psi, also


def duplicate_mask(micrograph: np.ndarray, xy_angst: np.ndarray, score: np.ndarray, min_separation_angst: float) -> np.ndarray:
    """Keep one particle of every group picked closer than the separation.

    Parameters
    ----------
    micrograph : (n,) array
        Micrograph identifier of each particle.
    xy_angst : (n, 2) float
        Particle centres in the micrograph after the alignment shifts, Å.
    score : (n,) float
        Higher is better (e.g. max posterior); of two close picks the better stays.
    min_separation_angst : float

    Returns
    -------
    (n,) bool: True = keep.
    """
    from scipy.spatial import cKDTree  # here, not at the top: SciPy takes 0.1-0.2 s to import, and most sets have no picks

    n = len(score)
    keep = np.ones(n, dtype=bool)
    order = np.argsort(-np.asarray(score), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    _, groups = np.unique(np.asarray(micrograph).astype(str), return_inverse=True)
    for g in np.unique(groups):
        members = np.nonzero(groups == g)[0]
        if len(members) < 2:
            continue
        tree = cKDTree(xy_angst[members])
        for a, b in sorted(tree.query_pairs(min_separation_angst), key=lambda p: min(rank[members[p[0]]], rank[members[p[1]]])):
            i, j = members[a], members[b]
            if keep[i] and keep[j]:
                keep[j if rank[i] < rank[j] else i] = False
    return keep
