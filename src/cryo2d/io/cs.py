"""CryoSPARC ``.cs`` particle files: numpy structured arrays (``numpy.load``).

Conventions converted here and nowhere else: ``blob/idx`` is 0-based,
``ctf/df_angle_rad`` and ``ctf/phase_shift_rad`` are radians (``CTFParams``
holds degrees), ``alignments2D/class`` is 0-based, ``alignments2D/pose`` is
−psi in radians and ``alignments2D/shift`` −shift in pixels (RELION's
``_rlnAnglePsi`` and origin).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryo2d.errors import Cryo2DError, NoParticles
from cryo2d.io.mrc import StackRefs, _is_file, _one_line
from cryo2d.io.outputs import atomic_path, write_text_atomic
from cryo2d.particles import Assignments, CTFParams, ParticleSet

# CTFParams field -> (.cs field, factor to RELION units).
CTF_FIELDS = {
    "defocus_u_angst": ("ctf/df1_A", 1.0),
    "defocus_v_angst": ("ctf/df2_A", 1.0),
    "defocus_angle_deg": ("ctf/df_angle_rad", 180.0 / np.pi),
    "voltage_kv": ("ctf/accel_kv", 1.0),
    "cs_mm": ("ctf/cs_mm", 1.0),
    "amplitude_contrast": ("ctf/amp_contrast", 1.0),
}
# CTFParams field -> (.cs field, factor to RELION units, value when absent).
OPTIONAL_CTF_FIELDS = {
    "phase_shift_deg": ("ctf/phase_shift_rad", 180.0 / np.pi, 0.0),
    "bfactor_angst2": ("ctf/bfactor", 1.0, 0.0),
    "amplitude_scale": ("ctf/scale", 1.0, 1.0),
}
# Fields write_cs adds (replacing every alignments2D/* field of the input).
ALIGNMENT_FIELDS = [
    ("alignments2D/class", "<u4"),
    ("alignments2D/pose", "<f4"),
    ("alignments2D/shift", "<f4", (2,)),
    ("alignments2D/psize_A", "<f4"),
    ("alignments2D/class_posterior", "<f4"),
    ("alignments2D/class_ess", "<f4"),
    ("alignments2D/alpha", "<f4"),
]


def read_cs(
    path: str | os.PathLike,
    *,
    project_dir: str | os.PathLike | None = None,
    no_ctf: bool = False,
    open_stacks: bool = True,
) -> ParticleSet:
    """Read a CryoSPARC particle ``.cs`` file.

    Parameters
    ----------
    path : str or PathLike
        The ``.cs`` file (a numpy structured array).
    project_dir : str or PathLike, optional
        Folder that ``blob/path`` is relative to (a leading ``>`` is
        stripped). Default: the .cs file's folder, then its parent (the
        CryoSPARC project folder for ``PROJECT/J24/x.cs``), then the nearest
        folder above it with a ``project.json`` (the project folder of an
        export, ``PROJECT/exports/groups/...``), then the current folder,
        first that holds the stack.
    no_ctf : bool
        Do not read ``ctf/*`` fields (``ctf`` is None); otherwise a missing
        CTF field is an error.
    open_stacks : bool
        Open and validate the stacks (``MRCStack``), or leave a ``StackRefs``
        with ``box`` from ``blob/shape``.

    Returns
    -------
    ParticleSet
        ``kind="cs"``; ``table`` has one column per scalar field (bytes
        decoded to str) and ``name[j]`` columns for vector fields; ``extra``
        holds ``cs_array`` (the original array, with the fields of its
        passthrough files: see below), ``project_dir`` and ``passthrough``
        (a list of (Path, field names) of the passthrough files read). Images
        are read multiplied by ``blob/sign`` (CryoSPARC's contrast sign,
        -1 for particles cut from micrographs, where the protein is dark),
        so that the protein is bright, as in RELION's particle stacks;
        ``StackRefs.sign`` holds it.

    Notes
    -----
    CryoSPARC writes most job outputs as two files: the job's own fields
    (``J103_020_particles.cs``: ``blob/*``, ``alignments2D/*``) and the
    fields it passed through from earlier jobs
    (``J103_passthrough_particles.cs``: ``ctf/*``, ``location/*``, ...).
    When the file lacks the CTF (``ctf/df1_A``, unless ``no_ctf``) or the
    pick locations (``location/center_x_frac``), the ``*passthrough*.cs``
    files beside it that hold every one of its particles (by ``uid``) add
    the fields it lacks, as ``cryosparc-tools``' ``Job.load_output`` does.
    """
    path = Path(path)
    label = str(path)
    if not _is_file(path):
        raise Cryo2DError(f"{label}: file not found")
    array = _load(path, label)
    _check_blob(array, label, is_passthrough(path.name))
    passthrough: list[tuple[Path, list[str]]] = []
    wanted = [name for name in _PASSTHROUGH_FIELDS if not (no_ctf and name.startswith("ctf/"))]
    if any(name not in array.dtype.names for name in wanted):
        array, passthrough = _merge_passthrough(array, path)
    return particles_from_array(array, path, project_dir=project_dir, no_ctf=no_ctf, open_stacks=open_stacks,
                                passthrough=passthrough)


def particles_from_array(
    array: np.ndarray,
    path: Path,
    *,
    project_dir: str | os.PathLike | None = None,
    no_ctf: bool = False,
    open_stacks: bool = True,
    passthrough: list[tuple[Path, list[str]]] | None = None,
    stacks_near: Path | None = None,
) -> ParticleSet:
    """The ``ParticleSet`` of a CryoSPARC particle array read from ``path`` (see :func:`read_cs`).

    ``passthrough`` lists the files (and their field names) merged into
    ``array`` besides ``path``'s own; ``path`` names the set in messages.
    Relative ``blob/path`` values are looked for from ``stacks_near``
    (default ``path``) as :func:`read_cs` describes.
    """
    label = str(path)
    _check_blob(array, label)
    refs = _stack_refs(array, Path(stacks_near or path), project_dir, label)
    particles = ParticleSet(
        stack=refs,
        ctf=None if no_ctf else _ctf(array, label),
        pixel_size_angst=_numbers(array, "blob/psize_A", label),
        table=_table(array),
        source=path,
        kind="cs",
        extra={
            "cs_array": array,
            "project_dir": project_dir,
            "passthrough": passthrough or [],
        },
    )
    if open_stacks:
        particles = replace(particles, stack=refs.open())
    return particles


def _check_blob(array: np.ndarray, label: str, passthrough_name: bool = False) -> None:
    """Cryo2DError unless ``array`` has particles with image references and pixel sizes."""
    for name in ("blob/path", "blob/idx"):
        if name not in array.dtype.names:
            hint = " (a CryoSPARC passthrough file: give the job's particle file)" if passthrough_name else ""
            raise Cryo2DError(f"{label}: field {name} missing (no particle images){hint}")
    if len(array) == 0:
        raise NoParticles(f"{label}: no particles")
    if "blob/psize_A" not in array.dtype.names:
        raise Cryo2DError(f"{label}: field blob/psize_A missing (no pixel size)")


def _load(path: Path, label: str) -> np.ndarray:
    """The structured array in ``path``, never unpickling and never allocating more than the file holds.

    Memory-mapping first checks the header's shape against the file size (a
    header may declare terabytes) and refuses object dtypes; the checked
    array is then copied into memory. A file in cryosparc-tools' compressed
    format (``CSDAT_FORMAT``, not numpy's) is read with cryosparc-tools when
    it is installed.
    """
    if _starts_with(path, _CSDAT_MAGIC):
        return _load_csdat(path, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on overflowing header shapes before it refuses them
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        array = mapped if isinstance(mapped, np.lib.npyio.NpzFile) else np.array(mapped)
        del mapped
    except Exception as err:  # a damaged header raises ValueError, SyntaxError, tokenize.TokenError, ...
        why = "its header declares more data than the file holds" if "mmap length" in str(err) else _one_line(err)
        raise Cryo2DError(f"{label}: not a CryoSPARC .cs file ({why})") from err
    if isinstance(array, np.lib.npyio.NpzFile):
        array.close()
        raise Cryo2DError(f"{label}: not a CryoSPARC .cs file (a .npz archive, expected one structured array)")
    if array.dtype.names is None or array.ndim != 1:
        raise Cryo2DError(f"{label}: not a CryoSPARC .cs file (expected a 1-D structured array)")
    return array


# The first bytes of cryosparc-tools' compressed .cs format (Dataset.save(..., format=CSDAT_FORMAT)).
_CSDAT_MAGIC = b"\x95CSDAT"


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(prefix)) == prefix
    except OSError:
        return False  # np.load below says why


def _load_csdat(path: Path, label: str) -> np.ndarray:
    """A compressed-format .cs file as numpy's structured array, through cryosparc-tools' reader."""
    try:
        from cryosparc.dataset import Dataset
    except ImportError:
        raise Cryo2DError(
            f"{label}: a .cs file in cryosparc-tools' compressed format (CSDAT), not numpy's: install cryosparc-tools "
            "(pip install cryosparc-tools) to read it, or save it with Dataset.save(path) (the numpy format)"
        ) from None
    try:
        records = Dataset.load(path).to_records(fixed=True)
    except Exception as err:  # a damaged stream: the reader's own errors
        raise Cryo2DError(f"{label}: not a readable compressed CryoSPARC .cs file ({_one_line(err)})") from err
    return structured([(name, records[name]) for name in records.dtype.names])  # plain, as numpy's .cs files give


def structured(columns: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """A 1-D structured array with one field per (name, values), in this order.

    Each field takes its values' dtype; values of shape (n, ...) make a
    field of shape (...) (``blob/shape``: (n, 2) -> a field of 2 numbers).
    """
    out = np.empty(len(columns[0][1]), dtype=[(name, values.dtype, values.shape[1:]) for name, values in columns])
    for name, values in columns:
        out[name] = values
    return out


def is_passthrough(name: str) -> bool:
    """Whether ``name`` is a CryoSPARC passthrough file's (``J5_passthrough_particles.cs``): read with the
    particle file beside it (:func:`read_cs`), not as one."""
    return name.lower().endswith(".cs") and "passthrough" in name


# Fields that CryoSPARC may keep in a passthrough file: the CTF (not needed with no_ctf), the pick locations.
_PASSTHROUGH_FIELDS = ("ctf/df1_A", "location/center_x_frac")


def _merge_passthrough(array: np.ndarray, path: Path) -> tuple[np.ndarray, list[tuple[Path, list[str]]]]:
    """``array`` with the fields it lacks from the passthrough files beside ``path`` (see :func:`read_cs`).

    A candidate is a ``*passthrough*.cs`` file in the same folder, read as
    a .cs file, with unique ``uid`` values that include every ``uid`` of
    ``array``; its rows are matched by ``uid``. Candidates are taken in
    name order, and a field already present is never replaced. Files that
    are not such a candidate are passed over. Returns the merged array
    and, for each file that added fields, (its path, the field names).
    """
    if "uid" not in array.dtype.names or not path.parent.is_dir():
        return array, []
    uid = array["uid"]
    used: list[tuple[Path, list[str]]] = []
    for other in sorted(path.parent.iterdir()):
        if not is_passthrough(other.name) or other.resolve() == path.resolve() or not _is_file(other):
            continue
        try:
            extra = _load(other, str(other))
        except Cryo2DError:
            continue
        new = [name for name in extra.dtype.names if name not in array.dtype.names]
        if "uid" not in extra.dtype.names or not new:
            continue
        rows = rows_by_uid(uid, extra["uid"])
        if rows is None:
            continue
        array = structured([(n, array[n]) for n in array.dtype.names] + [(n, extra[n][rows]) for n in new])
        used.append((other, new))
    return array, used


def rows_by_uid(uid: np.ndarray, other: np.ndarray) -> np.ndarray | None:
    """(n,) row of ``other`` that holds each of ``uid``'s n values; None when ``other`` repeats a value or lacks one."""
    order = np.argsort(other, kind="stable")
    sorted_uid = other[order]
    if len(sorted_uid) == 0 or (len(sorted_uid) > 1 and (sorted_uid[1:] == sorted_uid[:-1]).any()):
        return None
    where = np.minimum(np.searchsorted(sorted_uid, uid), len(sorted_uid) - 1)
    return None if (sorted_uid[where] != uid).any() else order[where]


def passthrough_note(particles: ParticleSet) -> str | None:
    """The line that names the CryoSPARC passthrough files a .cs input's fields came from (None: none)."""
    used = particles.extra.get("passthrough") or []
    if not used:
        return None
    groups = sorted({name.split("/")[0] + "/*" for _, fields in used for name in fields})
    files = ", ".join(path.name for path, _ in used)
    return f"read {', '.join(groups)} from {files} (CryoSPARC's passthrough fields, matched by uid)"


def _numbers(array: np.ndarray, name: str, label: str, kinds: str = "biuf") -> np.ndarray:
    """Field ``name`` as (n,) float64; Cryo2DError unless it holds one real number per particle."""
    values = array[name]
    if values.dtype.kind not in kinds or values.ndim != 1:
        raise Cryo2DError(
            f"{label}: field {name} has type {values.dtype.str}{values.shape[1:] or ''} "
            "(expected one number per particle)"
        )
    return values.astype(np.float64)


def _ctf(array: np.ndarray, label: str) -> CTFParams:
    values = {}
    for field, (name, factor) in CTF_FIELDS.items():
        if name not in array.dtype.names:
            raise Cryo2DError(
                f"{label}: field {name} missing, and no CryoSPARC passthrough file beside it holds it "
                "(copy the job's *_passthrough_*.cs here; --no-ctf classifies without CTF)"
            )
        values[field] = _numbers(array, name, label) * factor
    for field, (name, factor, absent) in OPTIONAL_CTF_FIELDS.items():
        present = name in array.dtype.names
        values[field] = _numbers(array, name, label) * factor if present else np.full(len(array), absent)
    return CTFParams(**values)


def _stack_refs(array: np.ndarray, path: Path, project_dir, label: str) -> StackRefs:
    paths = array["blob/path"]
    if paths.dtype.kind not in "SU" or paths.ndim != 1:
        raise Cryo2DError(f"{label}: field blob/path has type {paths.dtype.str}{paths.shape[1:] or ''} (expected file names)")
    # An image number must be a whole number an MRC header can count to (int32).
    image_index = _numbers(array, "blob/idx", label, kinds="iuf")
    bad = ~((image_index >= 0) & (image_index <= np.iinfo(np.int32).max) & (image_index % 1 == 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise Cryo2DError(f"{label}: blob/idx {array['blob/idx'][i]} of particle {i + 1} is not an image number")
    raw_names, codes = np.unique(paths, return_inverse=True)
    names = [_decode(n).removeprefix(">") for n in raw_names]
    for name in names:
        if name == "" or any(ord(c) < 32 for c in name):
            raise Cryo2DError(f"{label}: bad blob/path {name!r}")
    bases = search_folders(path, project_dir)
    places = [[Path(n)] if Path(n).is_absolute() else [base / n for base in bases] for n in names]
    box = 0
    if "blob/shape" in array.dtype.names and array["blob/shape"].dtype.kind in "iu" and len(array):
        shapes = np.unique(array["blob/shape"].reshape(len(array), -1), axis=0)
        if len(shapes) == 1 and shapes[0][0] == shapes[0][-1] and 1 <= shapes[0][0] <= np.iinfo(np.int32).max:
            box = int(shapes[0][0])
    sign = None
    if "blob/sign" in array.dtype.names:
        sign = _numbers(array, "blob/sign", label)
        bad = (sign != 1) & (sign != -1)
        if bad.any():
            i = int(np.argmax(bad))
            raise Cryo2DError(f"{label}: blob/sign {array['blob/sign'][i]} of particle {i + 1} is not 1 or -1")
        sign = None if (sign == 1).all() else sign.astype(np.float32)
    return StackRefs(
        label=label, names=names, candidates=places, file_index=codes.reshape(-1).astype(np.int64),
        image_index=image_index.astype(np.int64), index_base=0, box=box, sign=sign,
        missing_hint="blob/path is relative to the CryoSPARC project folder: give it with --project-dir",
    )


def project_blob_path(particles: ParticleSet, target: str | os.PathLike) -> str:
    """``target`` as a ``blob/path`` of the CryoSPARC project that ``particles`` come from.

    Relative to the project folder (``extra["project_dir"]``, else the
    folder that the particles' relative ``blob/path`` values were found
    from) when ``target`` lies inside it, as CryoSPARC names its files;
    otherwise the absolute path.
    """
    base = particles.extra.get("project_dir")
    if base is None:
        files, names = getattr(particles.stack, "files", []), getattr(particles.stack, "names", [])
        for found, name in zip(files, names):
            if not Path(name).is_absolute() and ".." not in Path(name).parts:
                base = found
                for _ in Path(name).parts:
                    base = base.parent
                break
    target = Path(target).resolve()
    if base is not None and target.is_relative_to(Path(base).resolve()):
        return target.relative_to(Path(base).resolve()).as_posix()
    return str(target)


def search_folders(path: Path, project_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders a CryoSPARC path relative to the project is looked for in, for a file at ``path``.

    ``project_dir`` when given; else ``path``'s folder, its parent, the
    nearest folder above it that holds a ``project.json`` (a CryoSPARC
    project's), and the current folder, in this order.
    """
    if project_dir is not None:
        return [Path(project_dir)]
    root = next((folder for folder in Path(path).absolute().parents if (folder / "project.json").is_file()), None)
    return list(dict.fromkeys([path.parent, path.parent.parent, *([root] if root else []), Path.cwd()]))


def _decode(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _table(array: np.ndarray) -> pd.DataFrame:
    """One column per scalar field, ``name[j]`` per element of vector fields."""
    columns = {}
    for name in array.dtype.names:
        values = array[name]
        if values.dtype.kind == "S":
            uniques, inverse = np.unique(values, return_inverse=True)
            columns[name] = np.array([_decode(u) for u in uniques], dtype=object)[inverse.reshape(-1)]
        elif values.ndim == 1:
            columns[name] = values
        else:
            for j, column in enumerate(values.reshape(len(array), -1).T):
                columns[f"{name}[{j}]"] = column
    return pd.DataFrame(columns)


def write_cs(
    particles: ParticleSet,
    path: str | os.PathLike,
    assignments: Assignments | None = None,
    rows: np.ndarray | None = None,
) -> None:
    """Write particles, with 2D classification results, as a CryoSPARC ``.cs`` file.

    Parameters
    ----------
    particles : ParticleSet
        Read by ``read_cs`` (needs ``extra["cs_array"]``); every input field
        is kept.
    path : str or PathLike
        Output file, written atomically (``numpy.save`` to a file object, so
        the name keeps its ``.cs``). Its CryoSPARC result group is written
        beside it, with the suffix ``.csg``
        (:func:`cryo2d.io.csg.result_group_text`): what CryoSPARC's Import
        Result Group job reads.
    assignments : Assignments, optional
        Same length as ``particles``. Adds ``alignments2D/class`` (0-based),
        ``pose`` (psi in radians), ``shift`` ((m, 2) px), ``psize_A`` (Å),
        ``class_posterior``, ``class_ess`` and ``alpha`` (scale), in place of
        every ``alignments2D/*`` field of the input (an earlier 2D
        classification's). ``keep`` is not applied: pass ``rows`` to leave particles out.
    rows : (m,) int array or (n,) bool mask, optional
        0-based particles to write, in this order (default: all).
    """
    array = particles.extra["cs_array"]
    pixel_size_angst = particles.pixel_size_angst
    if rows is not None:
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        array, pixel_size_angst = array[rows], pixel_size_angst[rows]
    if assignments is not None:
        assert len(assignments.class_index) == len(particles), "assignments must cover every particle"
        picked = assignments if rows is None else assignments.subset(rows)
        array = _with_assignments(array, picked, pixel_size_angst)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    from cryo2d.io.csg import result_group_text

    write_text_atomic(Path(path).with_suffix(".csg"), result_group_text(Path(path).name, array.dtype.names, len(array)))


def _with_assignments(array: np.ndarray, a: Assignments, pixel_size_angst: np.ndarray) -> np.ndarray:
    # The alignments2D slot is this classification's alone: an earlier 2D job's fields
    # (CryoSPARC's alignments2D/error, cross_cor, pose_ess, ...) would describe other classes.
    kept = [(name, array.dtype.fields[name][0]) for name in array.dtype.names if not name.startswith("alignments2D/")]
    out = np.zeros(len(array), dtype=kept + ALIGNMENT_FIELDS)
    for name, _ in kept:
        out[name] = array[name]
    out["alignments2D/class"] = np.asarray(a.class_index, dtype=np.int64)
    # The same sense as the STAR writer's _rlnAnglePsi and _rlnOriginX/Y (both
    # negated), in radians and pixels: CryoSPARC's pose and shift convert to
    # RELION's psi and origin unchanged (pyem's csparc2star).
    out["alignments2D/pose"] = np.deg2rad(np.mod(-np.asarray(a.psi_deg, dtype=np.float64), 360.0))
    out["alignments2D/shift"] = 0.0 - np.asarray(a.shift_px, dtype=np.float64).reshape(-1, 2)  # 0.0, not -0.0
    out["alignments2D/psize_A"] = pixel_size_angst
    out["alignments2D/class_posterior"] = a.class_posterior
    out["alignments2D/class_ess"] = a.class_ess
    out["alignments2D/alpha"] = a.scale
    return out
