"""Rebalance 2D classes: cap over-represented views (like CryoSPARC's Rebalance 2D Classes).

Classes of a job are grouped into *superclasses* of similar views by the
rotation-invariant similarity of their class averages (``class_similarity``:
best normalised cross-correlation over in-plane rotations and mirrors, on
low-passed averages), with average-linkage agglomerative clustering
(``scipy.cluster.hierarchy``). Each superclass is then capped so that it holds
at most ``max_share`` of the particles that remain, by dropping particles
chosen at random (``numpy.random.default_rng(seed)``); smaller superclasses
keep all their particles, so every view survives.

Outputs (``rebalance``): ``OUT/particles.star`` (or ``.cs``) with the kept
rows, ``OUT/dropped.star`` (or ``.cs``) with the rest, and
``OUT/superclasses.star`` mapping each class to its superclass with the
counts before and after. A mirrored class average counts as the same view (a
projection along the opposite direction is the mirror image).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from cryo2d._callable import make_callable
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import radius_grid, resize_images, rotate_images
from cryo2d.io import write_particles
from cryo2d.io.star import write_blocks
from cryo2d.select import Job, clear_stale_outputs, output_folder, read_job

__all__ = [
    "DEFAULT_SIMILARITY_THRESHOLD",
    "RebalanceResult",
    "cap_size",
    "class_similarity",
    "group_classes",
    "rebalance",
    "rebalance_job",
]

# Automatic grouping (no n_superclasses given): classes whose rotation-invariant
# NCC (average linkage) is at least this are the same view.
DEFAULT_SIMILARITY_THRESHOLD = 0.9
_WORK_BOX = 32  # class averages are Fourier-cropped to at most this many px (a low-pass)


def class_similarity(averages: np.ndarray, *, n_psi: int = 36, mirror: bool = True) -> np.ndarray:
    """Rotation-invariant similarity between class averages.

    Parameters
    ----------
    averages : (K, box, box) float array
        Class averages. Each is Fourier-cropped to at most 32 px (keeping
        only the low frequencies that define a view), multiplied by a disc of
        radius 0.45·box, mean-subtracted inside it and scaled to unit norm.
    n_psi : int
        In-plane rotations tried (step 360/n_psi degrees).
    mirror : bool
        Also try the mirror image (x → −x) of each rotated average.

    Returns
    -------
    (K, K) float64 ndarray
        Symmetric; entry (a, b) is the largest normalised cross-correlation
        of a with b rotated (and mirrored), in [−1, 1]; 1 on the diagonal.
        An all-zero average (an empty class) has similarity 0 to the others.
    """
    images = torch.as_tensor(np.asarray(averages, dtype=np.float32))
    K, box = images.shape[0], images.shape[-1]
    if box > _WORK_BOX:
        images = resize_images(images, _WORK_BOX)
        box = _WORK_BOX
    inside = (radius_grid(box) < 0.45 * box).to(images.dtype)

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x * inside
        x = (x - (x.sum((-2, -1), keepdim=True) / inside.sum())) * inside
        flat = x.reshape(len(x), -1)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    base = unit(images)  # (K, p)
    angles = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    sim = torch.full((K, K), -1.0, dtype=torch.float32)
    # The mirror x -> -x about the centre pixel box // 2, the one rotate_images turns about
    # (a plain flip mirrors about (box - 1) / 2: one pixel off for even boxes).
    mirrored = torch.roll(torch.flip(images, dims=(-1,)), shifts=1 - box % 2, dims=-1)
    variants = [images, mirrored] if mirror else [images]
    for b in range(K):  # one class at a time: memory (2·n_psi, box, box)
        for img in variants:
            rotated = unit(rotate_images(img[b : b + 1].repeat(n_psi, 1, 1), angles, mode="bilinear"))
            sim[:, b] = torch.maximum(sim[:, b], (base @ rotated.T).amax(dim=1))
    sim = torch.maximum(sim, sim.T).double().numpy()
    empty = np.asarray(averages).reshape(K, -1).std(axis=1) == 0
    sim[empty, :] = 0.0
    sim[:, empty] = 0.0
    np.fill_diagonal(sim, 1.0)
    return sim


def group_classes(
    similarity: np.ndarray,
    active: np.ndarray | None = None,
    *,
    n_superclasses: int | None = None,
    threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
) -> np.ndarray:
    """Agglomerative (average-linkage) grouping of classes into superclasses.

    Parameters
    ----------
    similarity : (K, K) float array
        From ``class_similarity``; distance = 1 − similarity.
    active : (K,) bool array, optional
        Classes to group (default all); the others get superclass 0.
    n_superclasses : int, optional
        Number of superclasses (capped at the number of active classes).
        Default: cut the tree where the average similarity falls below
        ``threshold``.
    threshold : float
        Similarity above which classes are the same view (automatic mode).

    Returns
    -------
    (K,) int64 ndarray
        1-based superclass per class, numbered by first class (superclass 1
        holds class 1, when active); 0 for inactive classes.
    """
    K = len(similarity)
    active = np.ones(K, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    idx = np.flatnonzero(active)
    out = np.zeros(K, dtype=np.int64)
    if len(idx) == 0:
        return out
    if len(idx) == 1:
        out[idx] = 1
        return out
    distance = np.clip(1.0 - similarity[np.ix_(idx, idx)], 0.0, 2.0)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    if n_superclasses is None:
        labels = fcluster(tree, t=1.0 - threshold, criterion="distance")
    else:
        labels = fcluster(tree, t=min(int(n_superclasses), len(idx)), criterion="maxclust")
    # renumber by first appearance, so the numbering follows class order
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    renumber = np.empty(labels.max() + 1, dtype=np.int64)
    renumber[np.unique(labels)[order]] = np.arange(1, len(order) + 1)
    out[idx] = renumber[labels]
    return out


def cap_size(counts: np.ndarray, max_share: float) -> int | None:
    """The largest per-superclass cap c with c ≤ max_share × Σ min(count, c).

    Capping every superclass at c then leaves none with more than
    ``max_share`` of the particles kept.

    Parameters
    ----------
    counts : (S,) int array
        Particles per superclass (all > 0).
    max_share : float
        In (0, 1].

    Returns
    -------
    int or None
        The cap in particles; None when no cap can reach the share (fewer
        than 1/max_share superclasses).
    """
    counts = np.sort(np.asarray(counts, dtype=np.int64))
    if len(counts) == 0:
        return None
    c = np.arange(1, counts[-1] + 1, dtype=np.int64)
    below = np.searchsorted(counts, c, side="left")  # superclasses with count < c
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    total = cumulative[below] + c * (len(counts) - below)
    ok = c <= max_share * total + 1e-9
    return int(c[ok].max()) if ok.any() else None


@dataclass
class RebalanceResult:
    """What ``rebalance_job`` decided (and ``rebalance`` wrote).

    Attributes
    ----------
    superclass_of_class : (K,) int64
        1-based superclass of each class; 0 for empty classes.
    counts_before, counts_after : (S,) int64
        Particles per superclass before and after.
    cap : int
        Largest superclass size after rebalancing.
    keep : (n,) bool
        Particle rows kept.
    notes : list of str
        Things the user should know (e.g. the share could not be reached).
    paths : dict
        ``"particles"``, ``"dropped"``, ``"superclasses"`` -> Path (after writing).
    class_numbers : (K,) int64, optional
        The job's number of each class (``Job.numbers``; default 1..K), as printed.
    """

    superclass_of_class: np.ndarray
    counts_before: np.ndarray
    counts_after: np.ndarray
    cap: int
    keep: np.ndarray
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    class_numbers: np.ndarray | None = None

    def distribution(self) -> list[str]:
        """One line per superclass: its classes, count and share before -> after."""
        before_total = max(int(self.counts_before.sum()), 1)
        after_total = max(int(self.counts_after.sum()), 1)
        numbers = self.class_numbers if self.class_numbers is not None else np.arange(1, len(self.superclass_of_class) + 1)
        lines = []
        for s, (nb, na) in enumerate(zip(self.counts_before, self.counts_after), start=1):
            members = ",".join(str(numbers[k]) for k in np.flatnonzero(self.superclass_of_class == s))
            lines.append(
                f"superclass {s:3d} (classes {members}): {nb:7d} ({100 * nb / before_total:5.1f}%) -> "
                f"{na:7d} ({100 * na / after_total:5.1f}%)"
            )
        return lines


def rebalance_job(
    job: Job,
    *,
    max_share: float = 0.1,
    n_superclasses: int | None = None,
    seed: int = 0,
) -> RebalanceResult:
    """Group a job's classes into superclasses and choose the particles to keep.

    Parameters
    ----------
    job : Job
        From ``cryo2d.select.read_job``.
    max_share : float
        Largest fraction of the kept particles any superclass may hold, in (0, 1].
    n_superclasses : int, optional
        Number of superclasses (default: automatic, ``DEFAULT_SIMILARITY_THRESHOLD``).
    seed : int
        Seed of ``numpy.random.default_rng`` for the random drops.

    Returns
    -------
    RebalanceResult
        Particles with no class (number 0) are dropped. When fewer than
        1/max_share superclasses exist the share cannot be reached: every
        superclass is cut to the size of the smallest (noted).

    Raises
    ------
    Cryo2DError
        ``max_share`` outside (0, 1] or ``n_superclasses`` < 1.
    """
    if not 0 < max_share <= 1:
        raise Cryo2DError(f"{job.folder}: --max-share must be in (0, 1], got {max_share}")
    if n_superclasses is not None and n_superclasses < 1:
        raise Cryo2DError(f"{job.folder}: --n-superclasses must be at least 1, got {n_superclasses}")
    counts = job.counts
    active = counts > 0
    superclass_of_class = group_classes(
        class_similarity(job.averages), active, n_superclasses=n_superclasses
    )
    S = int(superclass_of_class.max())
    number = job.class_number
    particle_super = np.where(number >= 1, superclass_of_class[np.maximum(number, 1) - 1], 0)
    particle_super[number < 1] = 0
    before = np.bincount(particle_super, minlength=S + 1)[1:].astype(np.int64)
    notes = []
    if (number < 1).any():
        notes.append(f"{int((number < 1).sum())} particles without a class were dropped")
    cap = cap_size(before, max_share) if S else 0
    if cap is None:
        cap = int(before.min())
        notes.append(
            f"only {S} superclass{'es' if S != 1 else ''}: no cap can bring each to {max_share:g} of the particles; "
            f"every superclass was cut to the smallest ({cap} particles)"
        )
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(number), dtype=bool)
    for s in range(1, S + 1):
        members = np.flatnonzero(particle_super == s)
        if len(members) > cap:
            members = np.sort(rng.choice(members, size=cap, replace=False))
        keep[members] = True
    after = np.bincount(particle_super[keep], minlength=S + 1)[1:].astype(np.int64)
    return RebalanceResult(superclass_of_class, before, after, int(cap), keep, notes, class_numbers=job.numbers)


def rebalance(
    job_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_share: float = 0.1,
    n_superclasses: int | None = None,
    seed: int = 0,
) -> RebalanceResult:
    """Rebalance a job's views and write the kept and dropped particles.

    Parameters
    ----------
    job_dir : str or PathLike
        Classification job folder, or a selection folder of ``cryo2d select``
        (only its classes are grouped; ``read_job(..., selection=True)``).
    out_dir : str or PathLike
        Created if needed; gets ``particles{.star,.cs}`` (kept),
        ``dropped{.star,.cs}`` and ``superclasses.star`` (block
        ``superclasses``: ``rlnClassNumber``, ``superclass``,
        ``rlnClassParticleCount``, ``count_after``), each atomically. The
        other files of ``cryo2d.select.OUTPUT_FILES`` there (an earlier
        select or rebalance run's) are removed; a folder that
        ``cryo2d.select.output_folder`` refuses (the job's, a classification
        job's) is an error.
    max_share, n_superclasses, seed
        See ``rebalance_job``.

    Returns
    -------
    RebalanceResult
    """
    job = read_job(job_dir, selection=True)
    result = rebalance_job(job, max_share=max_share, n_superclasses=n_superclasses, seed=seed)
    out = output_folder(job, out_dir)
    paths = {
        "particles": out / f"particles{job.suffix}",
        "dropped": out / f"dropped{job.suffix}",
        "superclasses": out / "superclasses.star",
    }
    clear_stale_outputs(out, list(paths.values()))
    write_particles(job.particles, paths["particles"], rows=np.flatnonzero(result.keep))
    write_particles(job.particles, paths["dropped"], rows=np.flatnonzero(~result.keep))
    valid = (job.class_number >= 1)
    after_per_class = np.bincount(job.class_number[result.keep & valid] - 1, minlength=job.n_classes)
    table = pd.DataFrame({
        "rlnClassNumber": job.numbers,
        "superclass": result.superclass_of_class,
        "rlnClassParticleCount": job.counts,
        "count_after": after_per_class.astype(np.int64),
    })
    write_blocks({"superclasses": table}, paths["superclasses"])
    result.paths = paths
    return result


make_callable(__name__)  # cryo2d.rebalance(...) calls rebalance above (cryo2d._callable)
