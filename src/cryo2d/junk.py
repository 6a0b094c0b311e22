"""Junk scores of 2D class averages: how unlike a centred, isolated particle a class looks.

Four rotation-invariant features of each class average, measured in three
zones defined by the radius r from the centre pixel (box//2, box//2) as a
fraction of the box edge: the *centre* disc r < 0.3, the *edge ring*
0.4 ≤ r < 0.5 and the *disc* r < 0.5. The background level (median of the
edge ring) is subtracted first.

``contrast``
    sd(centre) / sd(edge ring). A particle stands out from a flat background
    (engine classes of real views: 8-15 on simulated data); averages of
    noise, ice or unaligned junk are about as variable at the edge as in the
    centre (0.5-2).
``edge``
    Fraction of the disc's power (Σ a²) in the edge ring: density reaching the
    edge of the box, i.e. neighbours, doublets, ice or carbon edges. Centred
    particles: < 0.05.
``offcentre``
    Distance of the power centroid (weights a², sign-independent) from the
    centre, in units of the box half-width. Centred particles: < 0.1.
``blob``
    Featureless round blob: the share of the disc's power explained by the
    rotational average (radial profile), times 1 when that profile falls
    monotonically from the centre (0 when it has as much rise as fall: rings
    and shells such as apoferritin are not blobs).

Each feature is mapped to a partial score in [0, 1] by a linear ramp
between two documented limits (``RAMPS``: at the first limit the feature is
normal, score 0; at the second it is junk, score 1), and the class's junk
score is the largest partial score: one clear sign of junk is enough. Classes
with no particles score 1. The default selection threshold
``DEFAULT_MAX_JUNK_SCORE = 0.5`` keeps a class only while every feature is
below the midpoint of its ramp: contrast > 2.25, edge < 0.165, offcentre < 0.25
and blob < 0.935.

Limits: a class average with too little signal (few particles at low SNR)
is indistinguishable from noise and scores as junk; a genuinely round,
solid particle seen at low resolution scores as a blob.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_MAX_JUNK_SCORE", "RAMPS", "junk_features", "junk_scores"]

DEFAULT_MAX_JUNK_SCORE = 0.5

# feature -> (normal value: partial score 0, junk value: partial score 1)
RAMPS: dict[str, tuple[float, float]] = {
    "contrast": (3.0, 1.5),
    "edge": (0.08, 0.25),
    "offcentre": (0.15, 0.35),
    "blob": (0.90, 0.97),
}

_CENTRE, _RING_IN, _RING_OUT = 0.3, 0.4, 0.5


def _ramp(values: np.ndarray, normal: float, junk: float) -> np.ndarray:
    return np.clip((values - normal) / (junk - normal), 0.0, 1.0)


def junk_features(averages: np.ndarray) -> pd.DataFrame:
    """The four junk features of each class average (see the module docstring).

    Parameters
    ----------
    averages : (K, box, box) float array
        Class averages, indexed [y, x]; any contrast sign.

    Returns
    -------
    pandas.DataFrame
        K rows, columns ``contrast``, ``edge``, ``offcentre``, ``blob`` (floats).
    """
    averages = np.asarray(averages, dtype=np.float64)
    assert averages.ndim == 3 and averages.shape[1] == averages.shape[2], averages.shape
    K, box = len(averages), averages.shape[-1]
    y, x = np.indices((box, box)) - box // 2
    radius_px = np.hypot(x, y)
    r = radius_px / box
    centre, ring, disc = r < _CENTRE, (r >= _RING_IN) & (r < _RING_OUT), r < _RING_OUT
    shell = np.round(radius_px).astype(np.int64)
    n_shells = int(shell[disc].max()) + 1
    shell_count = np.bincount(shell[disc], minlength=n_shells).astype(np.float64)
    rows = []
    for a in averages:
        a = a - np.median(a[ring])
        power = a[disc] ** 2
        total = power.sum()
        if total <= 0 or not np.isfinite(total):
            rows.append({"contrast": 0.0, "edge": 1.0, "offcentre": 1.0, "blob": 1.0})
            continue
        contrast = a[centre].std() / max(a[ring].std(), 1e-12 * np.abs(a).max())
        edge = (a[ring] ** 2).sum() / total
        offcentre = np.hypot((power * x[disc]).sum(), (power * y[disc]).sum()) / total / (box / 2)
        profile = np.bincount(shell[disc], weights=a[disc], minlength=n_shells) / np.maximum(shell_count, 1)
        radial_share = (profile[shell[disc]] ** 2).sum() / total
        profile = profile * np.sign(profile[0] or 1.0)
        steps = np.diff(profile)
        variation = np.abs(steps).sum()
        monotonic = 1.0 - 2.0 * steps[steps > 0].sum() / variation if variation > 0 else 0.0
        rows.append({
            "contrast": float(contrast),
            "edge": float(edge),
            "offcentre": float(offcentre),
            "blob": float(radial_share * max(monotonic, 0.0)),
        })
    return pd.DataFrame(rows, columns=list(RAMPS), index=pd.RangeIndex(K))


def junk_scores(averages: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Junk score of each class, in [0, 1] (0 = looks like a particle).

    Parameters
    ----------
    averages : (K, box, box) float array
        Class averages.
    counts : (K,) array, optional
        Particles per class; classes with 0 score 1.

    Returns
    -------
    (K,) float64 ndarray
        max over features of the feature's ramp (``RAMPS``).
    """
    features = junk_features(averages)
    partial = np.stack([_ramp(features[name].to_numpy(), *RAMPS[name]) for name in RAMPS], axis=1)
    scores = partial.max(axis=1) if len(features) else np.zeros(0)
    if counts is not None:
        scores = np.where(np.asarray(counts) > 0, scores, 1.0)
    return scores.astype(np.float64)
