"""RELION STAR particle files (3.0 single block, 3.1+ optics + particles).

A thin layer over the ``starfile`` library: it finds the particle block,
merges optics-group values into per-particle CTF and pixel size, turns the
1-based ``index@stack`` image names into 0-based stack references, and
writes the rows back with classification results in RELION's units.
"""
from __future__ import annotations

import linecache
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryo2d.errors import Cryo2DError, NoParticles
from cryo2d.io.mrc import StackRefs, _factorize, _is_file, _one_line
from cryo2d.io.outputs import atomic_path
from cryo2d.particles import Assignments, CTFParams, ParticleSet

# CTFParams field -> STAR label (without the leading underscore, as starfile gives it).
CTF_COLUMNS = {
    "defocus_u_angst": "rlnDefocusU",
    "defocus_v_angst": "rlnDefocusV",
    "defocus_angle_deg": "rlnDefocusAngle",
    "voltage_kv": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
}
# CTFParams field -> (column, value when absent).
OPTIONAL_CTF_COLUMNS = {
    "phase_shift_deg": ("rlnPhaseShift", 0.0),
    "bfactor_angst2": ("rlnCtfBfactor", 0.0),
    "amplitude_scale": ("rlnCtfScalefactor", 1.0),
    "phase_flipped": ("rlnCtfDataArePhaseFlipped", 0.0),
}


def read_star(path: str | os.PathLike, *, no_ctf: bool = False, open_stacks: bool = True,
              project_dir: str | os.PathLike | None = None) -> ParticleSet:
    """Read a RELION 3.0 or 3.1+ particle STAR file.

    Parameters
    ----------
    path : str or PathLike
        The STAR file. Relative stack paths in ``_rlnImageName`` are looked
        up in ``project_dir`` when given, then beside the STAR file, then in
        the current folder (RELION's names start from its project folder).
    no_ctf : bool
        Do not read CTF columns (``ctf`` is None); otherwise a missing CTF
        column is an error.
    open_stacks : bool
        Open and validate the MRC stacks (``stack`` is an ``MRCStack``; the
        stacks found only beside the STAR file are renamed in the table's
        ``_rlnImageName``, see :func:`open_star_stacks`); False leaves a
        ``StackRefs`` (no file touched, ``box`` from ``_rlnImageSize`` or 0).
    project_dir : str or PathLike, optional
        RELION's project folder, the first place relative stack paths are
        looked up.

    Returns
    -------
    ParticleSet
        ``kind="star"``; ``table`` is the particle block as read; ``extra``
        holds ``optics`` (DataFrame or None), ``blocks`` (every block, in
        file order), ``particles_block`` (its name) and ``star_version``
        (``"3.1"`` or ``"3.0"``).

    Notes
    -----
    Where a column is in both blocks, the CTF's values (``_CTF_PARTICLE_FIRST``)
    are the particle's and the others (pixel and box sizes) the optics
    group's, as RELION 3.1 reads them (``CTF::readByGroup`` looks in the
    particle row first; pixel sizes come from the optics table). Pixel size:
    ``_rlnImagePixelSize``, else ``_rlnDetectorPixelSize`` × 1e4 /
    ``_rlnMagnification``, else ``_rlnPixelSize``. Values are not
    checked for sign/finiteness here; ``cryo2d.io.read_particles`` does.
    """
    path = Path(path)
    label = str(path)
    if not _is_file(path):
        raise Cryo2DError(f"{label}: file not found")
    try:
        blocks = _read_blocks(path)
    except Exception as err:  # starfile raises many kinds on malformed text
        blocks = _read_blocks_with_plain_loop_headers(path)
        if blocks is None:
            raise Cryo2DError(f"{label}: not a readable STAR file ({_one_line(err)})") from err
    if not blocks:
        _refuse_non_utf8(path, label)  # starfile reads such a file as no blocks at all
    blocks = {name: pd.DataFrame([b]) if isinstance(b, dict) else b for name, b in blocks.items()}
    for name, block in blocks.items():
        twice = block.columns[block.columns.duplicated()]
        if len(twice):
            raise Cryo2DError(f"{label}: data_{name} has column _{twice[0]} more than once")
    particles_block = _particles_block(blocks, label)
    table = blocks[particles_block]
    if len(table) == 0:
        raise NoParticles(f"{label}: no particles")
    optics = blocks.get("optics") if particles_block != "optics" else None
    columns = _merged_columns(table, optics, label)

    ctf = None if no_ctf else _ctf(columns, label)
    refs = _stack_refs(table, optics, path, label, project_dir)
    pixel_size = _pixel_size(columns, label)
    particles = ParticleSet(
        stack=refs,
        ctf=ctf,
        pixel_size_angst=pixel_size,
        table=table,
        source=path,
        kind="star",
        extra={
            "optics": optics,
            "blocks": blocks,
            "particles_block": particles_block,
            "star_version": "3.1" if optics is not None else "3.0",
        },
        prior_shift_px=_prior_shifts(columns, pixel_size, label),
    )
    if open_stacks:
        particles = open_star_stacks(particles)
    return particles


def _read_blocks(path: Path) -> dict:
    """``starfile.read(path, always_dict=True)``."""
    # starfile reads lines through linecache and clears it only after a successful
    # parse: without these clears, a file rewritten after a failed read reads stale.
    linecache.clearcache()
    try:
        return starfile.read(path, always_dict=True)
    finally:
        linecache.clearcache()


def _read_blocks_with_plain_loop_headers(path: Path) -> dict | None:
    """The blocks of a STAR file whose loop headers hold blank or comment lines, or None if none does.

    RELION reads such a header (``loop_``, a blank line, then the labels; a
    ``# ...`` line between labels); ``starfile`` takes the first such line
    for the end of the labels and fails on the rest. The file is read again
    from a copy without those lines, so only a file that failed pays for it.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return None
    kept, in_header, dropped = [], False, 0
    for line in lines:
        text = line.strip()
        if text.startswith("loop_"):
            in_header = True
        elif in_header and (not text or text.startswith("#")):
            dropped += 1
            continue
        elif in_header and not text.startswith("_"):
            in_header = False
        kept.append(line)
    if not dropped:
        return None
    with tempfile.TemporaryDirectory(prefix="cryo2d-star-") as folder:
        copy = Path(folder) / path.name
        copy.write_text("".join(kept), encoding="utf-8")
        try:
            return _read_blocks(copy)
        except Exception:  # the file has other faults too: the first error is reported
            return None


def _particles_block(blocks: dict, label: str) -> str:
    if isinstance(blocks.get("particles"), pd.DataFrame) and "rlnImageName" in blocks["particles"]:
        return "particles"
    for name, block in blocks.items():
        if "rlnImageName" in block.columns:
            return name
    raise Cryo2DError(f"{label}: no data block with an _rlnImageName column (not a particle STAR file?)")


# CTF values that RELION 3.1 takes from the particle row when it has them, and from the optics
# group otherwise (CTF::readByGroup and CTF::readValue).
_CTF_PARTICLE_FIRST = ("rlnVoltage", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnSphericalAberration",
                       "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift", "rlnAmplitudeContrast")


def _merged_columns(table: pd.DataFrame, optics: pd.DataFrame | None, label: str) -> dict[str, pd.Series]:
    """Per-particle columns: the particle block's, overlaid by its optics group's but for the CTF values the
    particle block has (``_CTF_PARTICLE_FIRST``)."""
    columns = {name: table[name] for name in table.columns}
    if optics is None:
        return columns
    if "rlnOpticsGroup" not in optics:
        raise Cryo2DError(f"{label}: data_optics has no _rlnOpticsGroup column")
    if "rlnOpticsGroup" in table:
        groups = pd.to_numeric(table["rlnOpticsGroup"], errors="coerce")
    elif len(optics) == 1:
        groups = pd.Series(np.full(len(table), optics["rlnOpticsGroup"].iloc[0]), index=table.index)
    else:
        raise Cryo2DError(f"{label}: column _rlnOpticsGroup missing but data_optics has {len(optics)} groups")
    by_group = optics.set_index(pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce"))
    if by_group.index.duplicated().any():
        twice = by_group.index[by_group.index.duplicated()][0]
        raise Cryo2DError(f"{label}: data_optics defines optics group {twice} more than once")
    unknown = ~groups.isin(by_group.index)
    if unknown.any():
        raise Cryo2DError(
            f"{label}: particle rows refer to optics group {groups[unknown].iloc[0]}, which data_optics does not define"
        )
    for name in by_group.columns:
        if name in _CTF_PARTICLE_FIRST and name in table.columns:
            continue
        columns[name] = pd.Series(by_group[name].reindex(groups.to_numpy()).to_numpy(), index=table.index)
    return columns


def _numeric(columns: dict[str, pd.Series], name: str, label: str) -> np.ndarray | None:
    if name not in columns:
        return None
    values = pd.to_numeric(columns[name], errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        bad = columns[name].iloc[int(np.argmax(np.isnan(values)))]
        raise Cryo2DError(f"{label}: column _{name} has a non-numeric value ({bad!r})")
    return values


def _ctf(columns: dict[str, pd.Series], label: str) -> CTFParams:
    values = {}
    for field, name in CTF_COLUMNS.items():
        values[field] = _numeric(columns, name, label)
        if values[field] is None:
            raise Cryo2DError(f"{label}: column _{name} missing (use --no-ctf to classify without CTF)")
    premultiplied = _numeric(columns, "rlnCtfDataAreCtfPremultiplied", label)
    if premultiplied is not None and (premultiplied != 0).any():
        raise Cryo2DError(f"{label}: _rlnCtfDataAreCtfPremultiplied is 1: the images are already multiplied by "
                          "their CTF (subtomogram data); classify images as extracted, or use --no-ctf")
    n = len(values["defocus_u_angst"])
    for field, (name, absent) in OPTIONAL_CTF_COLUMNS.items():
        found = _numeric(columns, name, label)
        values[field] = np.full(n, absent) if found is None else found
    return CTFParams(**values)


def _pixel_size(columns: dict[str, pd.Series], label: str) -> np.ndarray:
    image = _numeric(columns, "rlnImagePixelSize", label)
    if image is not None:
        return image
    detector = _numeric(columns, "rlnDetectorPixelSize", label)
    magnification = _numeric(columns, "rlnMagnification", label)
    if detector is not None and magnification is not None:
        return detector * 1e4 / magnification
    plain = _numeric(columns, "rlnPixelSize", label)
    if plain is not None:
        return plain
    raise Cryo2DError(
        f"{label}: no pixel size (_rlnImagePixelSize, _rlnDetectorPixelSize with _rlnMagnification, "
        "or _rlnPixelSize) in the file"
    )


def _prior_shifts(columns: dict[str, pd.Series], pixel_size_angst: np.ndarray, label: str) -> np.ndarray | None:
    """(n, 2) shifts in px (``Assignments.shift_px``'s sense) from the origins, or None if none or all zero.

    RELION's origin is the translation that centres the particle, so the
    shift is its negative: ``_rlnOriginX/YAngst`` (3.1, Å, divided by each
    particle's pixel size) or ``_rlnOriginX/Y`` (3.0, px).
    """
    for x_name, y_name, scale in (("rlnOriginXAngst", "rlnOriginYAngst", pixel_size_angst),
                                  ("rlnOriginX", "rlnOriginY", 1.0)):
        x, y = _numeric(columns, x_name, label), _numeric(columns, y_name, label)
        if (x is None) != (y is None):
            raise Cryo2DError(f"{label}: column _{x_name if x is None else y_name} missing "
                              f"(_{y_name if x is None else x_name} is given)")
        if x is None:
            continue
        origin = np.stack([x, y], axis=1) / np.reshape(scale, (-1, 1))
        bad = ~np.isfinite(origin).all(axis=1)
        if bad.any():
            raise Cryo2DError(f"{label}: origin of particle {int(np.argmax(bad)) + 1} is not finite")
        return -origin if origin.any() else None
    return None


def _refuse_non_utf8(path: Path, label: str) -> None:
    """One line for a STAR file that is not UTF-8 text (the line and byte where it stops being so)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise Cryo2DError(f"{label}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line})") from None


def name_from_here(path: str | os.PathLike) -> str:
    """``path`` as a STAR file names a stack: from the current folder (RELION's project folder), or
    absolute when it lies outside it (RELION's ``000001@Class2D/job004/run_it025_classes.mrcs``)."""
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.abspath(path) if relative.startswith("..") else relative


def open_star_stacks(particles: ParticleSet) -> ParticleSet:
    """``particles`` (read by ``read_star``) with its stacks opened, and each stack that was found beside
    the STAR file, and not from the current folder, renamed in ``_rlnImageName`` so that the name finds
    it from the current folder.

    RELION reads image names relative to the folder it runs in (the
    project folder); ``read_star`` also looks beside the STAR file. The
    rows are written again into other folders (the job's particles.star,
    a selection), where a name that only worked beside the input would
    find nothing. Such a name becomes the path from the current folder,
    or the absolute path when the stack lies outside it.

    Parameters
    ----------
    particles : ParticleSet
        Read by ``read_star`` (``stack`` a ``StackRefs``).
    """
    stack = particles.stack.open()
    particles = replace(particles, stack=stack)
    renamed = {}
    for name, found in zip(stack.names, stack.files):
        here = Path(name)
        if here.is_absolute() or (_is_file(here) and os.path.samefile(here, found)):
            continue
        renamed[name] = name_from_here(found)
    if not renamed:
        return particles
    number, has_at, stacks = _split_image_names(particles.table["rlnImageName"].astype(str))
    new_stacks = stacks.map(lambda n: renamed.get(n, n))
    table = particles.table.copy()
    table["rlnImageName"] = (number + "@" + new_stacks).where(has_at, new_stacks)
    return replace(particles, table=table)


def _split_image_names(image_names: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """``000001@stack.mrcs`` names split: the image number's text, whether there is an ``@``, the stack
    name (stripped; the whole name when there is no ``@``)."""
    parts = image_names.str.partition("@")
    has_at = parts[1] == "@"
    return parts[0], has_at, parts[2].where(has_at, parts[0]).str.strip()


def _stack_refs(table: pd.DataFrame, optics: pd.DataFrame | None, path: Path, label: str,
                project_dir: str | os.PathLike | None = None) -> StackRefs:
    """Parse ``000001@stack.mrcs`` names (1-based) into 0-based stack references."""
    missing = table["rlnImageName"].isna().to_numpy()
    if missing.any():
        raise Cryo2DError(f"{label}: particle {int(np.argmax(missing)) + 1} has no _rlnImageName")
    image_names = table["rlnImageName"].astype(str)
    number, has_at, stack_names = _split_image_names(image_names)
    numbers = pd.to_numeric(number.where(has_at, "1"), errors="coerce")
    # MRC image counts are int32; control characters (NUL, CR) cannot be in a file name.
    bad = (numbers.isna() | (numbers < 1) | (numbers % 1 != 0) | (numbers > np.iinfo(np.int32).max)
           | (stack_names == "") | stack_names.str.contains(r"[\x00-\x1f]"))
    if bad.any():
        raise Cryo2DError(
            f"{label}: bad _rlnImageName {image_names[bad].iloc[0]!r} (expected e.g. 000001@stack.mrcs)"
        )
    codes, names = _factorize(stack_names.tolist())
    first = [Path(project_dir)] if project_dir is not None else []
    places = [[base / name for base in (*first, path.parent, Path.cwd())] if not Path(name).is_absolute()
              else [Path(name)] for name in names]
    places = [list(dict.fromkeys(p)) for p in places]
    box = 0
    if optics is not None and "rlnImageSize" in optics and optics["rlnImageSize"].nunique() == 1:
        size = pd.to_numeric(optics["rlnImageSize"], errors="coerce").iloc[0]
        if not (1 <= size <= np.iinfo(np.int32).max and size % 1 == 0):
            raise Cryo2DError(f"{label}: _rlnImageSize {optics['rlnImageSize'].iloc[0]!r} is not a box size in pixels")
        box = int(size)
    return StackRefs(
        label=label, names=names, candidates=places, file_index=codes,
        image_index=numbers.to_numpy(dtype=np.int64) - 1, index_base=1, box=box,
        missing_hint=("a relative path is read from the STAR file's folder or the current folder: run from the "
                      "folder it is relative to, as RELION runs in its project folder, or give that folder with "
                      "--project-dir"),
    )


def write_star(
    particles: ParticleSet,
    path: str | os.PathLike,
    assignments: Assignments | None = None,
    rows: np.ndarray | None = None,
) -> None:
    """Write particle rows, with classification results, as a RELION STAR file.

    Parameters
    ----------
    particles : ParticleSet
        Read by ``read_star`` (``kind="star"``); every block and every input
        column is written back as read (3.0 input stays 3.0: no optics block),
        but for the stacks in ``_rlnImageName`` that :func:`open_star_stacks`
        renamed.
    path : str or PathLike
        Output file, written atomically.
    assignments : Assignments, optional
        Same length as ``particles``. Adds (or overwrites) ``_rlnClassNumber``
        (class_index + 1), ``_rlnAnglePsi`` (−psi_deg, degrees), ``_rlnOriginXAngst`` /
        ``_rlnOriginYAngst`` (−shift_px × pixel size, Å: RELION's origin is the
        translation that centres the particle; 3.0 input without Å origins gets
        ``_rlnOriginX`` / ``_rlnOriginY`` in pixels, and the input's origins in
        the other unit are dropped), ``_rlnMaxValueProbDistribution``
        and ``_rlnNormCorrection`` (scale). ``keep`` is not applied: pass
        ``rows`` to leave particles out.
    rows : (m,) int array or (n,) bool mask, optional
        0-based particles to write, in this order (default: all).
    """
    extra = particles.extra
    table = particles.table
    if rows is not None:
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        table = table.iloc[rows]
    table = table.reset_index(drop=True)
    if assignments is not None:
        assert len(assignments.class_index) == len(particles), "assignments must cover every particle"
        picked = assignments if rows is None else assignments.subset(rows)
        pixel_size_angst = particles.pixel_size_angst if rows is None else particles.pixel_size_angst[rows]
        # Origins in Å as RELION 3.1 writes them, or in pixels for a 3.0 file that has them so.
        angstrom = extra.get("optics") is not None or "rlnOriginXAngst" in table.columns
        table = _with_assignments(table, picked, pixel_size_angst, angstrom)
    optics = extra.get("optics")
    blocks = dict(extra.get("blocks") or ({"optics": optics} if optics is not None else {}))
    blocks[extra.get("particles_block", "particles")] = table
    write_blocks(blocks, path)


def write_blocks(blocks: dict[str, pd.DataFrame], path: str | os.PathLike, *, creator: str = "cryo2d") -> None:
    """Write STAR data blocks atomically and reproducibly.

    Floats are written in their shortest exact form (every value reads back
    exactly), NaN as ``nan`` (as read, and as RELION writes it; starfile's
    default is ``<NA>``), and starfile's timestamped header line becomes
    ``# Created by <creator>``, so the same tables give the same bytes.
    """
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format=None, na_rep="nan")
        lines = tmp.read_text().splitlines(keepends=True)
        if lines and lines[0].startswith("# Created by the starfile"):
            lines[0] = f"# Created by {creator}\n"
        tmp.write_text("".join(lines))


# Columns RELION's Class2D writes about its own classification, which no longer describe
# the particles once they are classified again (a run_it025_data.star as input).
_STALE_CLASSIFICATION_COLUMNS = ("rlnLogLikeliContribution", "rlnNrOfSignificantSamples")


def _with_assignments(
    table: pd.DataFrame, a: Assignments, pixel_size_angst: np.ndarray, angstrom_origins: bool
) -> pd.DataFrame:
    table = table.drop(columns=[c for c in _STALE_CLASSIFICATION_COLUMNS if c in table.columns])
    shift_px = np.asarray(a.shift_px, dtype=np.float64).reshape(-1, 2)
    table["rlnClassNumber"] = np.asarray(a.class_index, dtype=np.int64) + 1
    # RELION aligns a particle to its reference by translating it by the origin
    # and then rotating it by _rlnAnglePsi (relion_stack_create
    # --apply_transformation; tests/io/test_relion_poses.py): the origin undoes our
    # shift and ψ our counter-clockwise rotation, so both are negated.
    table["rlnAnglePsi"] = np.mod(-np.asarray(a.psi_deg, dtype=np.float64), 360.0)
    # 0 − x, not −x: a zero shift is written 0.0, not -0.0. The input's origins in the other
    # unit are the old poses: left in, they would disagree with these (and a reader that
    # prefers them, ours included, would take the old ones).
    if angstrom_origins:
        table = table.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in table.columns])
        table["rlnOriginXAngst"] = 0.0 - shift_px[:, 0] * pixel_size_angst
        table["rlnOriginYAngst"] = 0.0 - shift_px[:, 1] * pixel_size_angst
    else:
        table = table.drop(columns=[c for c in ("rlnOriginXAngst", "rlnOriginYAngst") if c in table.columns])
        table["rlnOriginX"] = 0.0 - shift_px[:, 0]
        table["rlnOriginY"] = 0.0 - shift_px[:, 1]
    table["rlnMaxValueProbDistribution"] = np.asarray(a.max_prob, dtype=np.float64)
    table["rlnNormCorrection"] = np.asarray(a.scale, dtype=np.float64)
    return table
