"""Where each particle was picked: micrograph and centre in Å (for duplicate removal)."""
from __future__ import annotations

import numpy as np

from cryo2d.particles import ParticleSet


def pick_locations(particles: ParticleSet) -> tuple[np.ndarray, np.ndarray] | None:
    """Micrograph names and pick centres, or None when the file has no coordinates.

    STAR: ``_rlnMicrographName`` and ``_rlnCoordinateX/Y`` (micrograph px,
    converted with ``_rlnMicrographPixelSize`` or
    ``_rlnMicrographOriginalPixelSize`` when the optics table has it, else
    the particle pixel size). .cs: ``location/micrograph_path`` (or
    ``location/micrograph_uid``) and ``location/center_x_frac/center_y_frac``
    times ``location/micrograph_shape`` and ``location/micrograph_psize_A``.

    Returns
    -------
    micrograph : (n,) array of str
    xy_angst : (n, 2) float64
    """
    t = particles.table
    if particles.kind == "star":
        if not {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} <= set(t.columns):
            return None
        psize = np.asarray(particles.pixel_size_angst, dtype=np.float64)
        optics = particles.extra.get("optics")
        for name in ("rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"):
            if optics is None or name not in optics.columns:
                continue
            if "rlnOpticsGroup" in t.columns:
                by_group = optics.set_index("rlnOpticsGroup")[name]
                psize = by_group.reindex(t["rlnOpticsGroup"].to_numpy()).to_numpy(dtype=np.float64)
                break
            if len(optics) == 1:  # a particle block without the column: its one group is every particle's
                psize = np.full(len(t), float(optics[name].iloc[0]))
                break
        xy = np.stack([t["rlnCoordinateX"].to_numpy(float), t["rlnCoordinateY"].to_numpy(float)], axis=1)
        return t["rlnMicrographName"].astype(str).to_numpy(), xy * psize[:, None]
    mic_col = next((c for c in ("location/micrograph_path", "location/micrograph_uid") if c in t.columns), None)
    need = {"location/center_x_frac", "location/center_y_frac", "location/micrograph_shape[0]", "location/micrograph_shape[1]"}
    if mic_col is None or not need <= set(t.columns):
        return None
    psize = (
        t["location/micrograph_psize_A"].to_numpy(float)
        if "location/micrograph_psize_A" in t.columns
        else np.asarray(particles.pixel_size_angst, dtype=np.float64)
    )
    x = t["location/center_x_frac"].to_numpy(float) * t["location/micrograph_shape[1]"].to_numpy(float)
    y = t["location/center_y_frac"].to_numpy(float) * t["location/micrograph_shape[0]"].to_numpy(float)
    return t[mic_col].astype(str).to_numpy(), np.stack([x, y], axis=1) * psize[:, None]
