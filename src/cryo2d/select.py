"""Select 2D classes from a classification job and write their particles.

A job folder (written by ``cryo2d classify``) holds ``classes.mrcs``,
``classes.star`` and ``particles.star`` (or ``particles.cs``). ``read_job``
loads the class averages and table; ``choose_classes`` turns explicit class
numbers or automatic criteria into the selected class numbers;
``write_selection`` writes them (the ``cryo2d view`` Save button calls the same
function):

- ``OUT/particles.star`` (``.cs`` when the job's input was ``.cs``): the rows
  of the selected classes, every column kept;
- ``OUT/rejected.star`` (or ``.cs``): all other rows;
- ``OUT/templates.mrcs``: the selected class averages (float32, pixel size in
  the header), in class-number order, e.g. for template picking;
- ``OUT/classes.star``: their rows of the job's ``classes.star``, with the
  job's class numbers and ``_rlnReferenceImage`` pointing into
  ``templates.mrcs``. With it the folder is a *selection folder*, which
  ``read_job(..., selection=True)`` reads as a job of the selected classes
  (``cryo2d rebalance Select/good``).

The output folder may be an earlier selection (or rebalance) folder: the files
of those outputs (``OUTPUT_FILES``) that this run does not write are removed,
so that a ``particles.star`` left by an earlier run never hides the new
``particles.cs``. ``output_folder`` refuses a classification job's folder
(one holding a file in ``JOB_MARKERS``) and a folder holding particle files
that neither command wrote, such as the particle file a job was classified
from.

Class numbers are 1-based everywhere (``_rlnClassNumber``; a ``.cs`` file's
0-based ``alignments2D/class`` is converted). A particle with no class
(number 0) is always rejected.

Resolution criteria, in Å (smaller number = finer detail):

- ``min_res_angst`` ("lowest resolution accepted"): keep a class only if its
  resolution is at least this good, i.e. ``rlnEstimatedResolution ≤ min_res_angst``
  (``--min-res 20`` drops classes worse than 20 Å);
- ``max_res_angst`` ("highest resolution believed"): keep a class only if
  ``rlnEstimatedResolution ≥ max_res_angst`` (``--max-res 4`` drops classes
  claiming better than 4 Å, usually artefacts). A class whose resolution is
  not finite fails either criterion.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryo2d._callable import make_callable
from cryo2d.errors import Cryo2DError
from cryo2d.io import read_particles, write_particles, write_stack
from cryo2d.io.csg import select_templates
from cryo2d.io.outputs import JOB_MARKERS, make_output_folder, refuse_job_folder, refuse_overwriting_inputs, remove_stale
from cryo2d.io.star import name_from_here, write_blocks
from cryo2d.junk import DEFAULT_MAX_JUNK_SCORE, junk_scores
from cryo2d.particles import ParticleSet

__all__ = [
    "JOB_MARKERS",
    "Job",
    "OUTPUT_FILES",
    "SelectionCriteria",
    "SelectionResult",
    "applied_criteria",
    "choose_classes",
    "clear_stale_outputs",
    "output_folder",
    "parse_class_list",
    "read_job",
    "select",
    "small_classes_note",
    "write_selection",
]

_CLASS_COLUMNS = ("rlnClassNumber", "rlnClassParticleCount", "rlnEstimatedResolution")

_PARTICLE_FILES = tuple(f"{stem}{ext}" for stem in ("particles", "rejected", "dropped") for ext in (".star", ".cs", ".csg"))

#: Every file ``write_selection`` and ``cryo2d.rebalance.rebalance`` may write into their folder (``.csg``: the
#: result group beside each ``.cs``); those a run does not write are removed from it (``clear_stale_outputs``).
OUTPUT_FILES = (*_PARTICLE_FILES, "templates.mrcs", "classes.star", "templates.cs", "templates.csg", "superclasses.star")

# A folder with one of these was written by select (templates.mrcs) or rebalance (superclasses.star).
_OUTPUT_MARKERS = ("templates.mrcs", "superclasses.star")


# How long read_job waits for a cryo2d stream to finish writing an update (s), and how often it looks.
_STREAM_WAIT_S = 60.0
_STREAM_POLL_S = 0.5


@dataclass
class Job:
    """A classification job folder, read for selection (no particle images opened).

    Attributes
    ----------
    folder : Path
        The job folder.
    averages : (K, box, box) float32 ndarray
        Class averages from ``classes.mrcs``; row k is class k + 1.
    pixel_size_angst : float
        Pixel size of the class averages, Å (from the MRC header).
    table : pandas.DataFrame
        The ``classes`` block of ``classes.star`` (K rows, in class order).
    particles : ParticleSet
        ``particles.star`` or ``particles.cs`` read with ``open_stacks=False``
        and ``no_ctf=True``: only the rows are needed, never the images.
    class_number : (n,) int64
        1-based class of each particle row; 0 when it has none.
    unmasked : (K, box, box) float32 ndarray
        The averages before the solvent mask (``classes_unmasked.mrcs``,
        written with ``--flatten-solvent``), else ``averages``: the junk
        scores read these, as a flat solvent hides what they look for.
    numbers : (K,) int64 ndarray
        The classification job's number of each class: 1..K for a job
        folder, the selected classes' numbers for a selection folder
        (``class_number`` counts 1..K in this order).
    """

    folder: Path
    averages: np.ndarray
    pixel_size_angst: float
    table: pd.DataFrame
    particles: ParticleSet
    class_number: np.ndarray
    unmasked: np.ndarray | None = None
    numbers: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.unmasked is None:
            self.unmasked = self.averages
        if self.numbers is None:
            self.numbers = np.arange(1, len(self.averages) + 1, dtype=np.int64)

    @property
    def n_classes(self) -> int:
        """Number of classes K."""
        return len(self.averages)

    @property
    def counts(self) -> np.ndarray:
        """(K,) int64 particles per class, counted from the particle rows."""
        valid = self.class_number[(self.class_number >= 1) & (self.class_number <= self.n_classes)]
        return np.bincount(valid - 1, minlength=self.n_classes).astype(np.int64)

    @property
    def resolution_angst(self) -> np.ndarray:
        """(K,) float64 ``rlnEstimatedResolution`` per class, Å."""
        return pd.to_numeric(self.table["rlnEstimatedResolution"], errors="coerce").to_numpy(np.float64)

    @property
    def suffix(self) -> str:
        """``".star"`` or ``".cs"``: the format particles are written in."""
        return ".star" if self.particles.kind == "star" else ".cs"


def read_job(job_dir: str | os.PathLike, *, selection: bool = False) -> Job:
    """Read a classification job folder.

    Parameters
    ----------
    job_dir : str or PathLike
        Folder written by ``cryo2d classify`` (classes.mrcs, classes.star,
        particles.star or particles.cs).
    selection : bool
        Also accept a selection folder written by ``cryo2d select``
        (templates.mrcs, classes.star, particles.star/.cs): its classes are
        the selected ones, in the order of ``templates.mrcs``, with their
        job numbers in ``Job.numbers``.

    A ``cryo2d stream`` job folder (``stream.json``) is read while its
    ``stream.json`` says ``"complete"`` with the same update before and after
    the files are read (the stream replaces them one by one at each update);
    while it says ``"writing"``, this waits for it, up to ``_STREAM_WAIT_S``
    seconds.

    Returns
    -------
    Job

    Raises
    ------
    Cryo2DError
        A missing folder or file, an unreadable file, a classes.star without
        the class columns or with a different number of classes than
        classes.mrcs, particle class numbers outside 1..K, or a stream job
        still being written after ``_STREAM_WAIT_S`` seconds.
    """
    folder = Path(job_dir)
    if not folder.is_dir():
        raise Cryo2DError(f"{folder}: job folder not found")
    if not (folder / "stream.json").is_file():
        return _read_job_files(folder, selection)
    # A cryo2d stream job: its files are replaced one by one at each update, so they are one update's only
    # while stream.json says "complete", with the same update before and after they are read.
    deadline = time.monotonic() + _STREAM_WAIT_S
    while True:
        before = _stream_state(folder)
        try:
            job = _read_job_files(folder, selection) if before[1] in ("complete", None) else None
        except Cryo2DError:
            if _stream_state(folder) == before:
                raise
            job = None
        if job is not None and _stream_state(folder) == before:
            return job
        if time.monotonic() >= deadline:
            raise Cryo2DError(
                f"{folder / 'stream.json'}: cryo2d stream is writing update {before[0]} (status {before[1]!r} for "
                f"{_STREAM_WAIT_S:g} s), so the job's files may belong to two updates; try again once it says 'complete'"
            )
        time.sleep(_STREAM_POLL_S)


def _stream_state(folder: Path) -> tuple[object, object]:
    """(update, status) of a stream job's ``stream.json``; ("?", "unreadable") when it cannot be read."""
    try:
        state = json.loads((folder / "stream.json").read_text(encoding="utf-8"))
        return state.get("update"), state.get("status")  # no status: written before stream.json had one
    except (OSError, ValueError, AttributeError):
        return "?", "unreadable"


def _read_job_files(folder: Path, selection: bool) -> Job:
    """``read_job`` of a folder whose files are not being replaced."""
    if not (folder / "classes.mrcs").is_file() and (folder / "templates.mrcs").is_file():
        if selection:
            return _read_selection(folder)
        raise Cryo2DError(
            f"{folder}: a cryo2d select folder (templates.mrcs, no classes.mrcs); give the classification job folder"
        )
    averages, pixel, table = _read_classes(folder, "classes.mrcs")
    numbers = pd.to_numeric(table["rlnClassNumber"], errors="coerce").to_numpy()
    if not np.array_equal(numbers, np.arange(1, len(table) + 1)):
        raise Cryo2DError(f"{folder / 'classes.star'}: _rlnClassNumber must run 1..{len(table)} in order")
    particles = _read_job_particles(folder)
    class_number = _class_numbers(particles)
    bad = class_number > len(averages)
    if bad.any():
        raise Cryo2DError(
            f"{particles.source}: particle {int(np.argmax(bad)) + 1} is in class {class_number[bad][0]}, "
            f"but the job has {len(averages)} classes"
        )
    unmasked = None
    if (folder / "classes_unmasked.mrcs").is_file():
        unmasked, _ = _read_averages(folder / "classes_unmasked.mrcs")
        if unmasked.shape != averages.shape:
            raise Cryo2DError(
                f"{folder / 'classes_unmasked.mrcs'}: shape {unmasked.shape} differs from classes.mrcs {averages.shape}"
            )
    return Job(folder, averages, pixel, table, particles, class_number, unmasked)


def _read_selection(folder: Path) -> Job:
    """A selection folder (see :func:`read_job`) as a job of the selected classes."""
    averages, pixel, table = _read_classes(folder, "templates.mrcs")
    numbers = pd.to_numeric(table["rlnClassNumber"], errors="coerce").to_numpy(np.float64)
    if not (np.isfinite(numbers).all() and (numbers % 1 == 0).all() and (numbers >= 1).all()
            and (np.diff(numbers) > 0).all()):
        raise Cryo2DError(f"{folder / 'classes.star'}: _rlnClassNumber must be increasing class numbers")
    numbers = numbers.astype(np.int64)
    particles = _read_job_particles(folder)
    original = _class_numbers(particles)
    pos = np.searchsorted(numbers, original)
    listed = (pos < len(numbers)) & (numbers[np.minimum(pos, len(numbers) - 1)] == original)
    return Job(folder, averages, pixel, table, particles, np.where(listed, pos + 1, 0).astype(np.int64), None, numbers)


def _read_classes(folder: Path, stack: str) -> tuple[np.ndarray, float, pd.DataFrame]:
    """Class averages (from ``stack``), their pixel size and ``classes.star``'s table, one row per image."""
    averages, pixel = _read_averages(folder / stack)
    table = _read_class_table(folder / "classes.star")
    if len(table) != len(averages):
        raise Cryo2DError(f"{folder / 'classes.star'}: {len(table)} classes but {stack} has {len(averages)} images")
    return averages, pixel, table


def _read_averages(path: Path) -> tuple[np.ndarray, float]:
    if not path.is_file():
        raise Cryo2DError(f"{path}: file not found (not a classification job folder?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise ValueError("no data")
                data = np.array(mrc.data, dtype=np.float32)
                pixel = float(mrc.voxel_size.x)
    except (ValueError, OSError) as err:
        raise Cryo2DError(f"{path}: not a readable MRC stack ({' '.join(str(err).split())})") from err
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise Cryo2DError(f"{path}: expected a stack of square class averages, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise Cryo2DError(f"{path}: class averages have NaN/Inf pixels")
    return data, pixel


def _read_class_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise Cryo2DError(f"{path}: file not found (not a classification job folder?)")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile raises many kinds on malformed text
        raise Cryo2DError(f"{path}: not a readable STAR file ({' '.join(str(err).split())})") from err
    table = blocks.get("classes")
    if table is None and len(blocks) == 1:
        table = next(iter(blocks.values()))
    if isinstance(table, dict):
        table = pd.DataFrame([table])
    if not isinstance(table, pd.DataFrame):
        raise Cryo2DError(f"{path}: no data_classes block")
    for column in _CLASS_COLUMNS:
        if column not in table:
            raise Cryo2DError(f"{path}: column _{column} missing")
    return table.reset_index(drop=True)


def _read_job_particles(folder: Path) -> ParticleSet:
    candidates = [folder / "particles.star", folder / "particles.cs"]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise Cryo2DError(f"{folder}: no particles.star or particles.cs in the job folder")
    # Only rows are needed: stack paths in the job's file are relative to where
    # the input lived (RELION's convention), so they are not resolved here.
    return read_particles(found[0], no_ctf=True, open_stacks=False)


def _class_numbers(particles: ParticleSet) -> np.ndarray:
    """(n,) int64 1-based class per row, 0 for none."""
    table = particles.table
    if particles.kind == "star":
        column, offset = "rlnClassNumber", 0
    else:
        column, offset = "alignments2D/class", 1
    if column not in table:
        raise Cryo2DError(f"{particles.source}: column {column} missing (not written by cryo2d classify?)")
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(values).all() or (values % 1 != 0).any():
        raise Cryo2DError(f"{particles.source}: column {column} has non-integer values")
    numbers = values.astype(np.int64) + offset
    return np.maximum(numbers, 0)


@dataclass(frozen=True)
class SelectionCriteria:
    """Automatic class selection: a class is kept when it passes every given test.

    Attributes
    ----------
    min_particles : int, optional
        Keep classes with at least this many particles.
    min_res_angst : float, optional
        Lowest resolution accepted, Å: keep classes with
        ``rlnEstimatedResolution ≤ min_res_angst``.
    max_res_angst : float, optional
        Highest resolution believed, Å: keep classes with
        ``rlnEstimatedResolution ≥ max_res_angst``.
    max_junk_score : float, optional
        Keep classes whose junk score (``cryo2d.junk.junk_scores``, in
        [0, 1]) is at most this.
    """

    min_particles: int | None = None
    min_res_angst: float | None = None
    max_res_angst: float | None = None
    max_junk_score: float | None = None

    def __post_init__(self) -> None:
        """Refuse values that select nothing meaningful (a negative Å resolution, a junk score outside [0, 1])."""
        for value, ok, message in (
            (self.min_particles, lambda v: v >= 0, "--min-particles must be >= 0"),
            (self.min_res_angst, lambda v: v > 0, "--min-res must be positive (Å)"),
            (self.max_res_angst, lambda v: v > 0, "--max-res must be positive (Å)"),
            (self.max_junk_score, lambda v: 0 <= v <= 1, "--max-junk-score must be in [0, 1]"),
        ):
            if value is not None and not ok(value):
                raise Cryo2DError(f"{message}, got {value:g}")

    @classmethod
    def auto(cls) -> "SelectionCriteria":
        """The default automatic selection: junk score ≤ ``DEFAULT_MAX_JUNK_SCORE``."""
        return cls(max_junk_score=DEFAULT_MAX_JUNK_SCORE)

    def is_empty(self) -> bool:
        """True when no criterion is set."""
        return all(v is None for v in self.__dict__.values())

    def describe(self) -> str:
        """A short text such as ``"junk ≤ 0.5, n ≥ 20"``."""
        parts = []
        if self.max_junk_score is not None:
            parts.append(f"junk <= {self.max_junk_score:g}")
        if self.min_particles is not None:
            parts.append(f"n >= {self.min_particles}")
        if self.min_res_angst is not None:
            parts.append(f"res <= {self.min_res_angst:g} A")
        if self.max_res_angst is not None:
            parts.append(f"res >= {self.max_res_angst:g} A")
        return ", ".join(parts) or "none"


_MAX_RANGE = 100_000  # class numbers a range expands to at most (parse_class_list)


def parse_class_list(text: str, label: str = "--classes") -> list[int]:
    """Parse ``"1,4,7"`` or ``"1-3,8"`` into 1-based class numbers (sorted, unique).

    Raises
    ------
    Cryo2DError
        Anything that is not a comma-separated list of positive integers or ranges.
    """
    numbers: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise Cryo2DError(f"{label}: {part!r} is not a class number or range (e.g. 1,4,7 or 2-5)") from None
        if a < 1 or b < a:
            raise Cryo2DError(f"{label}: {part!r} is not a valid class number or range (classes start at 1)")
        # No job has 100,000 classes: a longer range is cut there (its end kept, for choose_classes'
        # "does not exist" line) instead of filling memory with numbers.
        numbers.update(range(a, min(b, a + _MAX_RANGE) + 1))
        numbers.add(b)
    if not numbers:
        raise Cryo2DError(f"{label}: no class numbers given")
    return sorted(numbers)


def applied_criteria(
    classes: list[int] | None, exclude: list[int] | None, criteria: SelectionCriteria | None
) -> SelectionCriteria | None:
    """The criteria :func:`choose_classes` applies: ``criteria``, or the automatic ones when nothing is given."""
    if classes is None and exclude is None and (criteria is None or criteria.is_empty()):
        return SelectionCriteria.auto()
    return criteria


def choose_classes(
    job: Job,
    *,
    classes: list[int] | None = None,
    exclude: list[int] | None = None,
    criteria: SelectionCriteria | None = None,
) -> np.ndarray:
    """The 1-based class numbers to keep.

    Start from ``classes`` (or every class), remove ``exclude``, then apply
    ``criteria`` when given. With none of the three, the automatic default
    ``SelectionCriteria.auto()`` applies (and empty classes are dropped).

    Parameters
    ----------
    job : Job
    classes : list of int, optional
        1-based class numbers to keep.
    exclude : list of int, optional
        1-based class numbers to drop.
    criteria : SelectionCriteria, optional

    Returns
    -------
    (m,) int64 ndarray
        Sorted 1-based class numbers.

    Raises
    ------
    Cryo2DError
        A class number outside 1..K (names classes.star).
    """
    K = job.n_classes
    for given, flag in ((classes, "--classes"), (exclude, "--exclude")):
        for number in given or []:
            if not 1 <= int(number) <= K:
                raise Cryo2DError(
                    f"{job.folder / 'classes.star'}: {flag} class {number} does not exist (the job has classes 1-{K})"
                )
    criteria = applied_criteria(classes, exclude, criteria)
    keep = np.zeros(K, dtype=bool)
    if classes is None:
        keep[:] = True
    else:
        keep[np.asarray(classes, dtype=np.int64) - 1] = True
    if exclude:
        keep[np.asarray(exclude, dtype=np.int64) - 1] = False
    if criteria is not None and not criteria.is_empty():
        keep &= passes(job, criteria)
    return np.flatnonzero(keep) + 1


def passes(job: Job, criteria: SelectionCriteria) -> np.ndarray:
    """(K,) bool: which classes pass every criterion (empty classes never pass)."""
    counts = job.counts
    res = job.resolution_angst
    ok = counts > 0
    if criteria.min_particles is not None:
        ok &= counts >= criteria.min_particles
    if criteria.min_res_angst is not None:
        ok &= np.isfinite(res) & (res <= criteria.min_res_angst)
    if criteria.max_res_angst is not None:
        ok &= np.isfinite(res) & (res >= criteria.max_res_angst)
    if criteria.max_junk_score is not None:
        ok &= junk_scores(job.unmasked, counts) <= criteria.max_junk_score
    return ok


# Median class size below which the junk score misjudges classes of particles.
# Averages of a few particles at low SNR are noisy up to the box edge, so their
# contrast falls towards that of noise. The good particles that the automatic
# selection kept (EM seed 0; benchmarks/README.md, session 42): on the 48 px
# `small` set (1,500 particles, SNR 0.1) 98.6 % at K = 12 (median 129 per
# class), 93.5 % at K = 50 (median 24), 82 % at K = 100 (median 11.5); on
# `hard` (5,000 particles, 64 px, SNR 0.05) 99.6 % at K = 20 (median 264),
# 95.4 % at K = 50 (median 98), 84 % at K = 100 (median 50); on `peer`
# (3,000 particles, 64 px, SNR 0.05) 88 % at K = 50 (median 66).
_FEW_PARTICLES = 100


def small_classes_note(
    job: Job,
    chosen: np.ndarray,
    criteria: SelectionCriteria | None,
    *,
    classes: list[int] | None = None,
    exclude: list[int] | None = None,
) -> str | None:
    """A note when the junk score rejected classes too small for it to judge, else None.

    Given when the non-empty classes hold a median of fewer than
    ``_FEW_PARTICLES`` particles and the junk score (``criteria.max_junk_score``)
    rejected classes of fewer than that many: classes that ``classes`` and
    ``exclude`` left in and every other criterion passed, so that only the
    junk score turned them away.

    Parameters
    ----------
    job : Job
    chosen : (m,) int array
        The selected 1-based class numbers (``choose_classes``).
    criteria : SelectionCriteria or None
        The criteria applied; no note when they hold no junk score.
    classes, exclude : list of int, optional
        The 1-based class numbers given to ``choose_classes`` (a class they
        leave out was not rejected by the junk score).
    """
    counts = job.counts
    if criteria is None or criteria.max_junk_score is None or not (counts > 0).any():
        return None
    median = float(np.median(counts[counts > 0]))
    if median >= _FEW_PARTICLES:
        return None
    candidate = np.ones(job.n_classes, dtype=bool)
    if classes is not None:
        candidate[:] = False
        candidate[np.asarray(classes, dtype=np.int64) - 1] = True
    if exclude:
        candidate[np.asarray(exclude, dtype=np.int64) - 1] = False
    others = replace(criteria, max_junk_score=None)
    if not others.is_empty():
        candidate &= passes(job, others)
    candidate[np.asarray(chosen, dtype=np.int64) - 1] = False
    small = candidate & (counts > 0) & (counts < _FEW_PARTICLES)
    small &= junk_scores(job.unmasked, counts) > criteria.max_junk_score
    if not small.any():
        return None
    return (
        f"note: the classes hold a median of {median:g} particles; the junk score rejected {int(small.sum())} "
        f"classes of fewer than {_FEW_PARTICLES} ({int(counts[small].sum())} particles), and averages of so few "
        f"particles can look like noise to it: look at them (cryo2d view {job.folder}) or classify with fewer classes"
    )


@dataclass
class SelectionResult:
    """What ``write_selection`` wrote.

    Attributes
    ----------
    classes : (m,) int64
        Selected 1-based class numbers (the order of ``templates.mrcs``).
    n_kept, n_rejected : int
        Particle rows written to the selected and rejected files.
    n_classes : int
        Classes in the job.
    paths : dict
        ``"particles"``, ``"rejected"``, ``"templates"`` -> Path.
    """

    classes: np.ndarray
    n_kept: int
    n_rejected: int
    n_classes: int
    paths: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: classes and particles kept and where they went."""
        listed = ",".join(str(c) for c in self.classes) or "none"
        total = max(self.n_kept + self.n_rejected, 1)
        return (
            f"selected {len(self.classes)} of {self.n_classes} classes ({listed}): "
            f"{self.n_kept} particles kept ({100 * self.n_kept / total:.1f}%), {self.n_rejected} rejected "
            f"-> {self.paths['particles'].parent}"
        )


def output_folder(job: Job, out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` for outputs derived from ``job``, refusing a folder whose files must not be replaced.

    An empty or new folder, or an earlier output of ``cryo2d select`` or
    ``cryo2d rebalance`` (re-run with other classes), is accepted.

    Parameters
    ----------
    job : Job
        The job (or selection) read.
    out_dir : str or PathLike
        The output folder; created if needed.

    Returns
    -------
    Path

    Raises
    ------
    Cryo2DError
        ``out_dir`` is the job folder; holds a classification job (a file
        of ``JOB_MARKERS``, e.g. checkpoint.pt); holds particle files that
        select or rebalance did not write (no templates.mrcs or
        superclasses.star beside them: e.g. the particle file that a job
        was classified from); would overwrite the job's particle file; or
        cannot be made.
    """
    out = Path(out_dir)
    if out.resolve() == job.folder.resolve():
        raise Cryo2DError(f"{out}: the output folder must differ from the job folder")
    if out.is_dir():
        refuse_job_folder(out)
        foreign = next((name for name in _PARTICLE_FILES if (out / name).exists()), None)
        if foreign is not None and not any((out / name).is_file() for name in _OUTPUT_MARKERS):
            raise Cryo2DError(
                f"{out}: holds {foreign}, not written by cryo2d select or rebalance (an input?); choose another folder"
            )
    refuse_overwriting_inputs(out, OUTPUT_FILES, [job.particles.source, *job.particles.extra.get("metafiles", [])])
    return make_output_folder(out)


def clear_stale_outputs(out: Path, written: list[Path]) -> None:
    """Remove the files of ``OUTPUT_FILES`` in ``out`` that this run does not write.

    A ``particles.star`` left by an earlier run beside the new ``particles.cs``
    (or ``rejected.star`` beside ``dropped.star``) would be read in its place.

    Parameters
    ----------
    out : Path
        The output folder.
    written : list of Path
        The files this run writes (a ``.cs`` file's ``.csg`` goes with it).
    """
    keep = {Path(path).name for path in written}
    remove_stale(out, OUTPUT_FILES, keep | {Path(name).with_suffix(".csg").name for name in keep if name.endswith(".cs")})


def write_selection(job: Job, classes: list[int] | np.ndarray, out_dir: str | os.PathLike) -> SelectionResult:
    """Write the particles of ``classes``, the rest, and their class averages.

    Parameters
    ----------
    job : Job
    classes : sequence of int
        1-based class numbers to keep (may be empty).
    out_dir : str or PathLike
        Created if needed. Gets ``particles{.star,.cs}``, ``rejected{.star,.cs}``,
        ``templates.mrcs`` and ``classes.star``; each written atomically. The other files of
        ``OUTPUT_FILES`` there (an earlier run's) are removed. Must not be the job folder, another
        classification job's folder or one holding particle files of others (``output_folder``).

    Returns
    -------
    SelectionResult

    Raises
    ------
    Cryo2DError
        A class number outside 1..K, or an ``out_dir`` that ``output_folder``
        refuses or cannot create.
    """
    chosen = np.unique(np.asarray(list(classes), dtype=np.int64))
    if len(chosen) and (chosen.min() < 1 or chosen.max() > job.n_classes):
        bad = chosen[(chosen < 1) | (chosen > job.n_classes)][0]
        raise Cryo2DError(
            f"{job.folder / 'classes.star'}: class {bad} does not exist (the job has classes 1-{job.n_classes})"
        )
    out = output_folder(job, out_dir)
    mask = np.isin(job.class_number, chosen)
    paths = {
        "particles": out / f"particles{job.suffix}",
        "rejected": out / f"rejected{job.suffix}",
        "templates": out / "templates.mrcs",
        "classes": out / "classes.star",
    }
    with_templates_cs = job.suffix == ".cs" and (job.folder / "class_averages.cs").is_file()
    if with_templates_cs:  # as CryoSPARC's templates_selected
        paths["templates_cs"] = out / "templates.cs"
    clear_stale_outputs(out, list(paths.values()))
    write_particles(job.particles, paths["particles"], rows=np.flatnonzero(mask))
    write_particles(job.particles, paths["rejected"], rows=np.flatnonzero(~mask))
    box = job.averages.shape[-1]
    templates = job.averages[chosen - 1] if len(chosen) else np.zeros((0, box, box), np.float32)
    write_stack(paths["templates"], templates, job.pixel_size_angst)
    table = job.table.iloc[chosen - 1].reset_index(drop=True)
    table["rlnReferenceImage"] = [f"{i:06d}@{name_from_here(paths['templates'])}" for i in range(1, len(chosen) + 1)]
    table["rlnClassNumber"] = job.numbers[chosen - 1]
    write_blocks({"classes": table}, paths["classes"])
    if with_templates_cs:
        select_templates(job.folder / "class_averages.cs", chosen - 1, paths["templates_cs"])
    return SelectionResult(chosen, int(mask.sum()), int((~mask).sum()), job.n_classes, paths)


def select(
    job_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    classes: list[int] | None = None,
    exclude: list[int] | None = None,
    criteria: SelectionCriteria | None = None,
) -> SelectionResult:
    """Read a job, choose classes (``choose_classes``) and write them (``write_selection``).

    Parameters
    ----------
    job_dir : str or PathLike
        Classification job folder.
    out_dir : str or PathLike
        Output folder (see ``write_selection``).
    classes, exclude : list of int, optional
        1-based class numbers to keep / drop.
    criteria : SelectionCriteria, optional
        Automatic criteria; with no ``classes``, ``exclude`` or criteria the
        default ``SelectionCriteria.auto()`` is used.

    Returns
    -------
    SelectionResult
    """
    job = read_job(job_dir)
    chosen = choose_classes(job, classes=classes, exclude=exclude, criteria=criteria)
    return write_selection(job, chosen, out_dir)


make_callable(__name__)  # cryo2d.select(...) calls select above (cryo2d._callable)
