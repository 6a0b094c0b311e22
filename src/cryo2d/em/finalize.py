"""After the last iteration: sort classes, align filaments, drop duplicate picks."""
from __future__ import annotations

import numpy as np
import torch

from cryo2d.fourier import rotate_images


def sort_order(counts: np.ndarray) -> np.ndarray:
    """Class order largest first (stable for ties): ``new -> old`` index array."""
    return np.argsort(-np.asarray(counts), kind="stable")


def principal_axis_deg(image: np.ndarray, threshold: float = 0.2) -> float:
    """Angle (degrees, from the x axis, counter-clockwise) of an image's long axis.

    Uses the second moments of the pixels above ``threshold × max`` (x =
    column, y = row, origin at the centre pixel).
    """
    img = np.asarray(image, dtype=np.float64)
    w = np.where(img > threshold * img.max(), img, 0.0)
    if w.sum() <= 0:
        return 90.0
    b = img.shape[-1]
    y, x = np.mgrid[:b, :b] - b // 2
    m = w.sum()
    cx, cy = (w * x).sum() / m, (w * y).sum() / m
    cov = np.array(
        [[(w * (x - cx) ** 2).sum(), (w * (x - cx) * (y - cy)).sum()], [0.0, (w * (y - cy) ** 2).sum()]]
    ) / m
    cov[1, 0] = cov[0, 1]
    vals, vecs = np.linalg.eigh(cov)
    v = vecs[:, np.argmax(vals)]
    return float(np.degrees(np.arctan2(v[1], v[0])))


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
    phi = np.array([90.0 - principal_axis_deg(c) for c in classes])
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
