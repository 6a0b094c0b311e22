"""Scores of a 2D classification against the simulator's ground truth.

These are the project's official definitions, used by the tests and by
``benchmarks/quality.py`` to compare cryo2d with RELION Class2D:

- a *junk class* is a class in which more than half of the particles are junk
  (truth kind ``noise``, ``ice``, ``doublet``; view id -1);
- ``junk_f1``: F1 score of "particle is in a junk class" against "particle is
  junk";
- ``purity``: mean over non-junk, non-empty classes of the fraction of the
  class's particles that belong to its dominant view;
- ``rare_view_recovered``: the rare view is the dominant view of at least one
  non-junk class (None when the set has no rare view);
- ``median_ncc``: median over non-junk classes of the best normalised
  cross-correlation (over in-plane rotations and shifts) between the class
  average and the clean projection of its dominant view.

Labels are 0-based class indices (row ``k`` of the class-average stack);
a negative label means the particle is unassigned (for example, a particle
missing from a job's output table). Unassigned particles belong to no class:
they count as predicted non-junk in ``junk_f1`` and are ignored by ``purity``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cryo2d.errors import Cryo2DError
from cryo2d.fourier import fft2c, freq_grid, ifft2c, shift_phase

__all__ = [
    "ClassDetail",
    "NCCAlignment",
    "align_ncc",
    "best_ncc",
    "class_details",
    "fourier_resample",
    "junk_f1",
    "purity",
    "rare_view_recovered",
    "read_job_labels",
    "score_classification",
    "score_job",
]

_EPS = 1e-12


@dataclass(frozen=True)
class ClassDetail:
    """Ground-truth composition of one class.

    Attributes
    ----------
    label : int
        Class label as it appears in the label array.
    n_particles : int
        Particles assigned to the class.
    n_junk : int
        Of those, how many are junk (view id -1).
    is_junk_class : bool
        ``n_junk > n_particles / 2``.
    dominant_view : int
        Most frequent view id among the class's non-junk particles (smallest
        id on ties); -1 when the class has no non-junk particle.
    purity : float
        Fraction of all the class's particles (junk included) that belong to
        ``dominant_view``.
    """

    label: int
    n_particles: int
    n_junk: int
    is_junk_class: bool
    dominant_view: int
    purity: float


@dataclass(frozen=True)
class NCCAlignment:
    """Best normalised cross-correlation of an image against a reference.

    Attributes
    ----------
    ncc : float
        Normalised cross-correlation in [-1, 1] inside the reference's mask.
    psi_deg : float
        In-plane rotation (degrees, counter-clockwise in (x = column,
        y = row) coordinates, about pixel ``(box // 2, box // 2)``) applied
        to the image.
    shift_x_px, shift_y_px : float
        Shift (pixels, to 1/8 px) of the rotated image that best overlays
        the reference: ``reference(p) ~ rotated(p - shift)``.
    """

    ncc: float
    psi_deg: float
    shift_x_px: float
    shift_y_px: float


def _as_labels(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries, expected {n}")
    return labels.astype(np.int64)


def class_details(views: np.ndarray, labels: np.ndarray) -> list[ClassDetail]:
    """Per-class ground-truth composition.

    Parameters
    ----------
    views : (n,) int array
        True view id of each particle; -1 for junk.
    labels : (n,) int array
        Class label of each particle; negative = unassigned (skipped).

    Returns
    -------
    list of ClassDetail
        One entry per non-empty class, ordered by label.
    """
    views = np.asarray(views).astype(np.int64)
    labels = _as_labels(labels, views.shape[0])
    out = []
    for label in np.unique(labels[labels >= 0]):
        v = views[labels == label]
        n = int(v.size)
        n_junk = int(np.count_nonzero(v < 0))
        good = v[v >= 0]
        if good.size:
            ids, counts = np.unique(good, return_counts=True)
            dominant = int(ids[np.argmax(counts)])  # argmax picks the smallest id on ties
            pur = float(counts.max()) / n
        else:
            dominant, pur = -1, 0.0
        out.append(ClassDetail(int(label), n, n_junk, n_junk * 2 > n, dominant, pur))
    return out


def junk_f1(is_junk: np.ndarray, labels: np.ndarray) -> float:
    """F1 score of junk detection through junk classes.

    Parameters
    ----------
    is_junk : (n,) bool array
        True where the particle is junk.
    labels : (n,) int array
        Class label of each particle; negative = unassigned.

    Returns
    -------
    float
        ``2 TP / (2 TP + FP + FN)`` where predicted junk = particles in a class
        whose particles are more than half junk. 1.0 when there is neither true
        nor predicted junk.
    """
    is_junk = np.asarray(is_junk, dtype=bool)
    labels = _as_labels(labels, is_junk.shape[0])
    views = np.where(is_junk, -1, 0)
    junk_labels = [d.label for d in class_details(views, labels) if d.is_junk_class]
    predicted = np.isin(labels, junk_labels) & (labels >= 0)
    tp = int(np.count_nonzero(predicted & is_junk))
    fp = int(np.count_nonzero(predicted & ~is_junk))
    fn = int(np.count_nonzero(~predicted & is_junk))
    if tp + fp + fn == 0:
        return 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn)


def purity(views: np.ndarray, labels: np.ndarray) -> float:
    """Mean view purity of the non-junk classes.

    Parameters
    ----------
    views : (n,) int array
        True view id of each particle; -1 for junk.
    labels : (n,) int array
        Class label of each particle; negative = unassigned.

    Returns
    -------
    float
        Mean over non-empty, non-junk classes of the fraction of the class's
        particles (junk included) that belong to its dominant view; NaN when
        there is no such class. See :func:`class_details` for the per-class
        values.
    """
    values = [d.purity for d in class_details(views, labels) if not d.is_junk_class]
    return float(np.mean(values)) if values else float("nan")


def rare_view_recovered(views: np.ndarray, labels: np.ndarray, rare_view: int | None) -> bool | None:
    """Whether the rare view is the dominant view of some non-junk class (None: the set has none).

    Parameters
    ----------
    views : (n,) int array
        True view id of each particle; -1 for junk.
    labels : (n,) int array
        Class label of each particle; negative = unassigned.
    rare_view : int or None
        View id of the rare view; None when the set has no rare view.

    Returns
    -------
    bool, or None when ``rare_view`` is None
    """
    if rare_view is None:
        return None
    return any(
        d.dominant_view == int(rare_view) and not d.is_junk_class
        for d in class_details(views, labels)
    )


def fourier_resample(image: np.ndarray, box: int) -> np.ndarray:
    """Resample a square image to another box by Fourier cropping or padding.

    Parameters
    ----------
    image : (b, b) float array
        Real-space image, origin at pixel ``(b // 2, b // 2)``.
    box : int
        Output box (pixels). The field of view is kept, so the pixel size
        changes by ``b / box``.

    Returns
    -------
    (box, box) float64 array
        Intensities scaled so that the mean is preserved.
    """
    image = np.asarray(image, dtype=np.float64)
    b = image.shape[-1]
    if image.shape != (b, b):
        raise ValueError(f"image must be square, got shape {image.shape}")
    if b == box:
        return image.copy()
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image)))
    out = np.zeros((box, box), dtype=np.complex128)
    m = min(b, box)
    src = slice(b // 2 - m // 2, b // 2 - m // 2 + m)
    dst = slice(box // 2 - m // 2, box // 2 - m // 2 + m)
    out[dst, dst] = f[src, src]
    res = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(out))).real
    return res * (box * box) / (b * b)


def _rotation_grid(box: int, psi_deg: np.ndarray) -> torch.Tensor:
    """Sampling grid (R, box, box, 2) for grid_sample, align_corners=True.

    Output pixel p samples the input at c + R(-psi)(p - c), c = box // 2, so
    the content rotates counter-clockwise by psi in (x = column, y = row).
    """
    c = box // 2
    coords = torch.arange(box, dtype=torch.float64) - c
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    psi = torch.as_tensor(np.deg2rad(psi_deg), dtype=torch.float64)[:, None, None]
    cos, sin = torch.cos(psi), torch.sin(psi)
    x_src = cos * xx + sin * yy + c
    y_src = -sin * xx + cos * yy + c
    scale = 2.0 / (box - 1)
    return torch.stack([x_src * scale - 1.0, y_src * scale - 1.0], dim=-1)


def _rotate(image: np.ndarray, psi_deg: np.ndarray) -> torch.Tensor:
    """Rotate one (b, b) image by each angle: (R, b, b) float64, bicubic, zero fill."""
    box = image.shape[-1]
    grid = _rotation_grid(box, np.atleast_1d(psi_deg))
    src = torch.as_tensor(image, dtype=torch.float64).expand(grid.shape[0], 1, box, box)
    return F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=True)[:, 0]


def align_ncc(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    psi_step_deg: float = 2.0,
    max_shift_px: int | None = None,
    mask_radius_px: float | None = None,
) -> NCCAlignment:
    """Best normalised cross-correlation over in-plane rotations and shifts.

    The reference is windowed by a circular mask; for every rotation of the
    image (bicubic, about ``box // 2``) and every integer shift up to
    ``max_shift_px`` in x and y, the Pearson correlation between the
    reference and the rotated, shifted image over the mask's pixels is
    computed with FFT cross-correlations (the image is zero-padded, so no
    wrap-around). The best of that grid is then refined: rotations within
    one ``psi_step_deg`` of it at a quarter step, and shifts within half a
    pixel of it at 1/8 px (Fourier-interpolated), re-centred on the new
    best up to three times while it improves, so that a sharp average is
    not scored by how its centre falls between pixels.

    Parameters
    ----------
    image : (b, b) float array
        Image to align, e.g. a class average. Fourier-resampled to the
        reference's box when ``b`` differs (same field of view assumed).
    reference : (B, B) float array
        Reference, e.g. a clean projection.
    psi_step_deg : float
        Rotation step (degrees) over [0, 360).
    max_shift_px : int, optional
        Largest shift searched in x and in y (pixels of the reference's box);
        default ``B // 4``.
    mask_radius_px : float, optional
        Radius (pixels) of the circular mask centred on ``(B // 2, B // 2)``;
        default ``B / 2 - 1``.

    Returns
    -------
    NCCAlignment
        The best correlation and the pose that gives it. NCC is 0 when the
        reference or the image is constant under the mask.
    """
    reference = np.asarray(reference, dtype=np.float64)
    big = reference.shape[-1]
    if reference.shape != (big, big):
        raise ValueError(f"reference must be square, got shape {reference.shape}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square, got shape {image.shape}")
    image = fourier_resample(image, big)
    if not (np.all(np.isfinite(image)) and np.all(np.isfinite(reference))):
        raise ValueError("image and reference must be finite")
    shift = big // 4 if max_shift_px is None else int(max_shift_px)
    radius = big / 2 - 1 if mask_radius_px is None else float(mask_radius_px)
    if psi_step_deg <= 0:
        raise ValueError(f"psi_step_deg must be positive, got {psi_step_deg}")

    c = big // 2
    yy, xx = np.mgrid[:big, :big] - c
    mask = (xx**2 + yy**2) <= radius**2
    n_mask = int(mask.sum())
    if n_mask < 2:
        raise ValueError(f"mask radius {radius} px leaves fewer than 2 pixels")
    ref = np.where(mask, reference - reference[mask].mean(), 0.0)
    ref_norm = np.sqrt((ref**2).sum())
    if ref_norm < _EPS:
        return NCCAlignment(0.0, 0.0, 0, 0)
    ref = ref / ref_norm

    psi = np.arange(0.0, 360.0, float(psi_step_deg))
    rotated = _rotate(image, psi)  # (R, B, B)
    size = big + shift + 1
    pad = (0, size - big, 0, size - big)
    x = F.pad(rotated, pad)
    w_ref = torch.fft.rfft2(F.pad(torch.as_tensor(ref), pad)).conj()
    w_mask = torch.fft.rfft2(F.pad(torch.as_tensor(mask.astype(np.float64)), pad)).conj()
    s = (size, size)
    # corr[t] = sum_p w(p) x(p + t), t taken modulo `size`.
    num = torch.fft.irfft2(torch.fft.rfft2(x) * w_ref, s=s)
    s1 = torch.fft.irfft2(torch.fft.rfft2(x) * w_mask, s=s)
    s2 = torch.fft.irfft2(torch.fft.rfft2(x * x) * w_mask, s=s)
    var = (s2 - s1 * s1 / n_mask).clamp_min(0.0)
    ok = var > _EPS * max(1.0, float((image**2).sum()))
    ncc = torch.where(ok, num / var.clamp_min(_EPS).sqrt(), torch.zeros_like(num))

    idx = np.r_[0 : shift + 1, size - shift : size]
    ncc = ncc[:, idx][:, :, idx]
    best = int(torch.argmax(ncc))
    r, iy, ix = np.unravel_index(best, ncc.shape)
    t_y = int(idx[iy]) if idx[iy] <= shift else int(idx[iy]) - size
    t_x = int(idx[ix]) if idx[ix] <= shift else int(idx[ix]) - size
    value = float(ncc[r, iy, ix].item())
    psi_best = float(psi[r])
    for _ in range(_REFINE_ROUNDS):  # re-centred on the last best while it improves
        fine = _refine_ncc(image, ref, mask, psi_best, float(psi_step_deg), (round(t_x), round(t_y)))
        if fine[0] <= value + 1e-12:
            break
        value, psi_best, (t_x, t_y) = fine
    # reference(p) ~ x(p + t), i.e. the rotated image shifted by -t.
    return NCCAlignment(float(np.clip(value, -1.0, 1.0)), psi_best % 360.0, -float(t_x), -float(t_y))


# The local refinement of align_ncc: rotations within one grid step of the
# best at a quarter of the step, shifts within half a pixel at 1/8 px.
_REFINE_PSI = np.linspace(-1.0, 1.0, 9)
_REFINE_SHIFT = np.linspace(-0.5, 0.5, 9)
_REFINE_ROUNDS = 3


def _refine_ncc(
    image: np.ndarray, ref: np.ndarray, mask: np.ndarray, psi0: float, psi_step: float, t0: tuple[int, int]
) -> tuple[float, float, tuple[float, float]]:
    """Best NCC near a grid pose, with sub-pixel shifts (sinc interpolation) and finer rotations.

    ``ref`` is the masked, zero-mean, unit-norm reference and ``mask`` its
    boolean mask, (B, B); ``t0`` = (t_x, t_y) is the grid's best integer
    shift in ``align_ncc``'s convention (reference(p) ~ x(p + t)). Sharp
    class averages sit anywhere between pixels, so the integer grid alone
    under-reads their correlation (a 64 px average at 3.7 Å: by 0.01).
    Returns (ncc, psi_deg, (t_x, t_y)) of the best refined pose.
    """
    big = ref.shape[-1]
    pad = int(max(abs(t0[0]), abs(t0[1]))) + 2
    size = big + 2 * pad
    psis = psi0 + psi_step * _REFINE_PSI
    rotated = F.pad(_rotate(image, psis), (pad, pad, pad, pad))  # (R, S, S), image at offset `pad`
    ty, tx = torch.meshgrid(torch.as_tensor(t0[1] + _REFINE_SHIFT), torch.as_tensor(t0[0] + _REFINE_SHIFT),
                            indexing="ij")
    t = torch.stack([tx.flatten(), ty.flatten()], dim=1)  # (Ty·Tx, 2) as (t_x, t_y)
    # y(p) = x(p + t): the content moves by -t.
    phase = shift_phase(freq_grid(size, dtype=torch.float64).reshape(-1, 2), -t).reshape(-1, size, size)
    X = fft2c(rotated)
    m = torch.as_tensor(mask, dtype=torch.float64)
    w = torch.as_tensor(ref)
    n_mask = float(m.sum())
    floor = _EPS * max(1.0, float((image**2).sum()))
    best = (-np.inf, psi0, (float(t0[0]), float(t0[1])))
    for i in range(len(psis)):
        y = ifft2c(X[i] * phase, real=True)[..., pad : pad + big, pad : pad + big]  # (Ty·Tx, B, B)
        num = (y * w).sum(dim=(-2, -1))
        s1 = (y * m).sum(dim=(-2, -1))
        s2 = (y * y * m).sum(dim=(-2, -1))
        var = s2 - s1 * s1 / n_mask
        ncc = torch.where(var > floor, num / var.clamp_min(_EPS).sqrt(), torch.zeros_like(num))
        j = int(torch.argmax(ncc))
        if float(ncc[j]) > best[0]:
            best = (float(ncc[j]), float(psis[i]), (float(t[j, 0]), float(t[j, 1])))
    return best


def best_ncc(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    psi_step_deg: float = 2.0,
    max_shift_px: int | None = None,
    mask_radius_px: float | None = None,
) -> float:
    """Best normalised cross-correlation over in-plane rotations and shifts.

    Same parameters as :func:`align_ncc`, which also returns the pose.

    Returns
    -------
    float
        Correlation in [-1, 1]: ~1 for a rotated, shifted copy of the
        reference, ~0 for an unrelated image.
    """
    return align_ncc(
        image,
        reference,
        psi_step_deg=psi_step_deg,
        max_shift_px=max_shift_px,
        mask_radius_px=mask_radius_px,
    ).ncc


def score_classification(
    truth: pd.DataFrame,
    labels: np.ndarray,
    class_averages: np.ndarray,
    view_projections: np.ndarray,
    rare_view: int | None,
    *,
    psi_step_deg: float = 2.0,
) -> dict:
    """All scores of one classification against the simulator's truth.

    Parameters
    ----------
    truth : DataFrame
        The simulator's ``truth.csv``, one row per particle in stack order,
        with a ``view`` column (int, -1 for junk).
    labels : (n,) int array
        0-based class index of each particle (row of ``class_averages``);
        negative = unassigned.
    class_averages : (K, b, b) float array
        Class averages.
    view_projections : (V, B, B) float array
        Clean projection of each view id (``views.mrcs``).
    rare_view : int or None
        View id of the rare view (None: the set has none, and
        ``rare_view_recovered`` is None).
    psi_step_deg : float
        Rotation step of the NCC search (degrees).

    Returns
    -------
    dict
        ``junk_f1``, ``purity``, ``rare_view_recovered``, ``median_ncc``
        (NaN when there is no non-junk class), ``n_nonempty_classes``,
        ``n_junk_classes``, ``n_particle_classes``, ``n_empty_classes``,
        ``n_particles``, ``n_unassigned``, and ``classes``: a list of
        per-class dicts (:class:`ClassDetail` fields plus ``ncc``, NaN for
        junk classes).
    """
    views = truth["view"].to_numpy().astype(np.int64)
    labels = _as_labels(labels, views.shape[0])
    class_averages = np.asarray(class_averages)
    n_classes = class_averages.shape[0]
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"label {labels.max()} out of range for {n_classes} class averages")
    details = class_details(views, labels)
    per_class = []
    nccs = []
    for d in details:
        ncc = float("nan")
        if not d.is_junk_class:
            if not 0 <= d.dominant_view < len(view_projections):
                raise ValueError(f"view {d.dominant_view} has no projection")
            ncc = best_ncc(
                class_averages[d.label], view_projections[d.dominant_view], psi_step_deg=psi_step_deg
            )
            nccs.append(ncc)
        per_class.append({**d.__dict__, "ncc": ncc})
    n_junk_classes = sum(d.is_junk_class for d in details)
    return {
        "junk_f1": junk_f1(views < 0, labels),
        "purity": purity(views, labels),
        "rare_view_recovered": rare_view_recovered(views, labels, rare_view),
        "median_ncc": float(np.median(nccs)) if nccs else float("nan"),
        "n_nonempty_classes": len(details),
        "n_junk_classes": n_junk_classes,
        "n_particle_classes": len(details) - n_junk_classes,
        "n_empty_classes": n_classes - len(details),
        "n_particles": int(labels.size),
        "n_unassigned": int(np.count_nonzero(labels < 0)),
        "classes": per_class,
    }


_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


def _particles_table(path: Path) -> pd.DataFrame:
    import starfile

    data = starfile.read(path, always_dict=True)
    for block in data.values():
        if isinstance(block, pd.DataFrame) and "rlnImageName" in block.columns:
            return block
    raise Cryo2DError(f"{path}: no data block with _rlnImageName")


def _latest_relion_iteration(job_dir: Path) -> tuple[Path, Path] | None:
    found = []
    for p in job_dir.glob("*_it*_data.star"):
        m = re.search(r"_it(\d+)_data\.star$", p.name)
        classes = p.with_name(p.name.replace("_data.star", "_classes.mrcs"))
        if m and classes.exists():
            found.append((int(m.group(1)), p, classes))
    if not found:
        return None
    _, star, classes = max(found)
    return star, classes


def read_job_labels(particles_star: str | Path, n_particles: int) -> tuple[np.ndarray, int]:
    """Map a job's class assignments back to the simulated stack order.

    Parameters
    ----------
    particles_star : path
        A STAR file with ``_rlnImageName`` (``000123@stack.mrcs``, 1-based)
        and ``_rlnClassNumber`` (1-based), e.g. cryo2d's ``particles.star``
        or RELION's ``run_it025_data.star``. Rows may be in any order.
    n_particles : int
        Number of particles in the simulated stack.

    Returns
    -------
    labels : (n_particles,) int64 array
        0-based class index per stack position (``000123@`` -> position 122);
        -1 where the particle is missing from the table.
    n_missing : int
        Number of stack positions missing from the table.
    """
    path = Path(particles_star)
    table = _particles_table(path)
    if "rlnClassNumber" not in table.columns:
        raise Cryo2DError(f"{path}: column _rlnClassNumber missing")
    index = np.empty(len(table), dtype=np.int64)
    for row, name in enumerate(table["rlnImageName"].astype(str)):
        m = _IMAGE_NAME.match(name)
        if m is None:
            raise Cryo2DError(f"{path}: image name {name!r} is not of the form N@stack")
        index[row] = int(m.group(1)) - 1
    if index.size and (index.min() < 0 or index.max() >= n_particles):
        raise Cryo2DError(f"{path}: image index outside 1..{n_particles}")
    classes = table["rlnClassNumber"].to_numpy().astype(np.int64) - 1
    labels = np.full(n_particles, -1, dtype=np.int64)
    # First occurrence wins when a particle appears twice.
    order = np.arange(index.size)[::-1]
    labels[index[order]] = classes[order]
    return labels, int(np.count_nonzero(labels < 0))


def score_job(
    job: str | Path | tuple[str | Path, str | Path],
    sim_dir: str | Path,
    *,
    psi_step_deg: float = 2.0,
) -> dict:
    """Score a cryo2d or RELION Class2D job against a simulated data set.

    Parameters
    ----------
    job : path or (particles_star, classes_mrcs)
        A job folder or the two files. A folder is read as cryo2d's output
        (``particles.star`` + ``classes.mrcs``) when those exist, otherwise as
        RELION's (the last ``*_itNNN_data.star`` with its
        ``*_itNNN_classes.mrcs``).
    sim_dir : path
        The simulator's folder: ``truth.csv``, ``views.mrcs``, ``truth.json``.
    psi_step_deg : float
        Rotation step of the NCC search (degrees).

    Returns
    -------
    dict
        :func:`score_classification`'s dict plus ``n_missing`` (particles
        of the stack absent from the job's table, scored as unassigned),
        ``particles_star`` and ``classes_mrcs`` (the files read).
    """
    import json

    import mrcfile

    if isinstance(job, (tuple, list)):
        star, classes_path = Path(job[0]), Path(job[1])
    else:
        job_dir = Path(job)
        if (job_dir / "particles.star").exists() and (job_dir / "classes.mrcs").exists():
            star, classes_path = job_dir / "particles.star", job_dir / "classes.mrcs"
        else:
            latest = _latest_relion_iteration(job_dir)
            if latest is None:
                raise Cryo2DError(
                    f"{job_dir}: neither particles.star + classes.mrcs nor RELION run_itNNN_data.star"
                )
            star, classes_path = latest
    sim_dir = Path(sim_dir)
    truth = pd.read_csv(sim_dir / "truth.csv")
    meta = json.loads((sim_dir / "truth.json").read_text())
    with mrcfile.open(sim_dir / "views.mrcs", permissive=True) as mrc:
        views = np.asarray(mrc.data, dtype=np.float32)
    with mrcfile.open(classes_path, permissive=True) as mrc:
        classes = np.asarray(mrc.data, dtype=np.float32)
    if views.ndim == 2:
        views = views[None]
    if classes.ndim == 2:
        classes = classes[None]
    labels, n_missing = read_job_labels(star, len(truth))
    if labels.max(initial=-1) >= classes.shape[0]:
        raise Cryo2DError(
            f"{star}: class number {labels.max() + 1} but {classes_path} has {classes.shape[0]} classes"
        )
    scores = score_classification(
        truth, labels, classes, views, meta.get("rare_view"), psi_step_deg=psi_step_deg
    )
    scores.update(n_missing=n_missing, particles_star=str(star), classes_mrcs=str(classes_path))
    return scores
