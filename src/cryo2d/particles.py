"""Particle-set data types: CTF parameters, image stacks, per-particle results.

No file-format code lives here (that is ``cryo2d.io``); these are the types
that flow from the readers into the engine and back to the writers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters in RELION's convention, each a length-n array.

    Attributes
    ----------
    defocus_u_angst, defocus_v_angst : (n,) float64
        Defocus along the two principal axes in Å, positive = underfocus.
    defocus_angle_deg : (n,) float64
        Azimuth of the U axis from the x axis, degrees (RELION ``_rlnDefocusAngle``;
        CryoSPARC stores radians, converted on reading).
    voltage_kv : (n,) float64
        Acceleration voltage, kV.
    cs_mm : (n,) float64
        Spherical aberration, mm.
    amplitude_contrast : (n,) float64
        Amplitude contrast Q0 as a fraction (0.1 = 10 %).
    phase_shift_deg : (n,) float64
        Additional phase shift (phase plate), degrees; 0 when absent.
    bfactor_angst2 : (n,) float64
        CTF B-factor envelope exp(-B s^2 / 4), Å^2; 0 when absent.
    amplitude_scale : (n,) float64
        Factor on the whole CTF (RELION ``_rlnCtfScalefactor``, CryoSPARC
        ``ctf/scale``); 1 when absent (None: ones).
    phase_flipped : (n,) float64
        1 where the images were phase-flipped (multiplied by the sign of their
        CTF, RELION ``_rlnCtfDataArePhaseFlipped``): their CTF is then |CTF|;
        0 when absent (None: zeros).
    """

    defocus_u_angst: np.ndarray
    defocus_v_angst: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_angst2: np.ndarray
    amplitude_scale: np.ndarray | None = None
    phase_flipped: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.amplitude_scale is None:
            object.__setattr__(self, "amplitude_scale", np.ones(len(self.defocus_u_angst)))
        if self.phase_flipped is None:
            object.__setattr__(self, "phase_flipped", np.zeros(len(self.defocus_u_angst)))

    def __len__(self) -> int:
        return len(self.defocus_u_angst)

    def subset(self, idx: np.ndarray) -> "CTFParams":
        """The CTF parameters of particles ``idx`` (any numpy index)."""
        return CTFParams(**{k: np.asarray(v)[idx] for k, v in self.__dict__.items()})


class ImageSource(Protocol):
    """Anything that hands out particle images by index (MRC stacks read on demand, arrays)."""

    box: int

    def __len__(self) -> int: ...

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` (0-based particle indices) as (b, box, box) float32."""
        ...

    def inverted(self) -> "ImageSource":
        """The same images with their contrast inverted (multiplied by -1), as a new source."""
        ...


@dataclass(frozen=True)
class ParticleSet:
    """A particle stack with its metadata, as read from a STAR or .cs file.

    Attributes
    ----------
    stack : ImageSource
        Lazy image access; ``stack.read(idx)`` gives (b, box, box) float32.
    ctf : CTFParams or None
        Per-particle CTF (None when the file has none and ``--no-ctf`` was given).
    pixel_size_angst : (n,) float64
        Per-particle pixel size in Å (from the optics group, ``blob/psize_A``...).
    table : pandas.DataFrame
        The original particle rows, written back untouched plus new columns.
        For .cs input it holds the structured array's fields as columns.
    source : Path
        The file the set was read from (for error messages and outputs).
    kind : str
        ``"star"`` or ``"cs"``.
    extra : dict
        Format-specific data needed to write the file back, e.g. the STAR
        ``optics`` block (``extra["optics"]``) or the original .cs structured
        array (``extra["cs_array"]``).
    prior_shift_px : (n, 2) float64 or None
        The shifts the file already gives the particles (RELION's
        ``_rlnOriginX/Y[Angst]`` from an earlier job), in px and in the sense
        of :attr:`Assignments.shift_px` (the particle's centre is this far
        from the box centre). As RELION's Class2D does, each image is centred
        by it before the search, which looks around it, and the written
        shifts include it. None: the file gives none (or all zero), or they
        are ignored (``--no-input-shifts``).
    """

    stack: ImageSource
    ctf: CTFParams | None
    pixel_size_angst: np.ndarray
    table: pd.DataFrame
    source: Path
    kind: str
    extra: dict[str, Any] = field(default_factory=dict)
    prior_shift_px: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pixel_size_angst)

    @property
    def box(self) -> int:
        """Image edge length in pixels."""
        return int(self.stack.box)


@dataclass
class Assignments:
    """Per-particle classification results, in neutral units.

    The writers convert these once: STAR gets 1-based ``_rlnClassNumber``,
    ``_rlnAnglePsi`` = −psi_deg (RELION's sense of rotation) in degrees and
    ``_rlnOriginX/YAngst`` = −shift_px in Å (RELION's origin: the translation
    that centres the particle); .cs gets 0-based ``alignments2D/class``,
    ``alignments2D/pose`` = −psi in radians and ``alignments2D/shift`` =
    −shift_px in pixels.

    Attributes
    ----------
    class_index : (n,) int64
        0-based class of each particle, in the order of the written classes.
    psi_deg : (n,) float64
        In-plane rotation, degrees: the particle is the class average rotated
        by psi (counter-clockwise, x right / y up) and then shifted.
    shift_px : (n, 2) float64
        (x, y) shift in pixels of the input box: particle = shift(rotate(class)).
    max_prob : (n,) float64
        Largest posterior over (class, rotation, shift) (RELION
        ``_rlnMaxValueProbDistribution``).
    class_posterior : (n,) float64
        Posterior probability of the chosen class (CryoSPARC ``class_posterior``).
    class_ess : (n,) float64
        Effective number of classes, 1 / sum_k p_k^2 (CryoSPARC ``class_ess``).
    scale : (n,) float64
        Per-particle scale factor (1 when not estimated).
    keep : (n,) bool
        False for particles removed as duplicate picks.
    """

    class_index: np.ndarray
    psi_deg: np.ndarray
    shift_px: np.ndarray
    max_prob: np.ndarray
    class_posterior: np.ndarray
    class_ess: np.ndarray
    scale: np.ndarray
    keep: np.ndarray

    def subset(self, idx: np.ndarray) -> "Assignments":
        return Assignments(**{k: np.asarray(v)[idx] for k, v in self.__dict__.items()})
