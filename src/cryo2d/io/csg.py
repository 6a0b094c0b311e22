"""CryoSPARC result groups (``.csg``): the YAML file beside an exported result's ``.cs`` files.

CryoSPARC writes one when a job's output is exported (Outputs, Export) and
reads one in its "Import Result Group" job. It names the group (for
particles, type ``particle``) and, for each slot of the group (``blob``,
``ctf``, ``location``, ``alignments2D``, ...), the ``.cs`` file that holds
the slot's fields (``metafile``; a leading ``>`` means beside the ``.csg``,
otherwise relative to the project folder), its number of rows
(``num_items``) and the slot's type (``particle.ctf``). The slots may lie in
different files, one row per particle in each, matched by ``uid``.

:func:`read_csg` reads a particle group as one structured array, each slot's
fields from its own file; :func:`result_group_text` is the ``.csg`` that
:func:`cryo2d.io.cs.write_cs` writes beside each ``.cs`` file;
:func:`write_templates` and :func:`select_templates` write class averages as
CryoSPARC's template group (2D classification's ``class_averages``, Select
2D's ``templates_selected``).
"""
from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

from cryo2d import __version__
from cryo2d.errors import Cryo2DError
from cryo2d.io.cs import _load, particles_from_array, rows_by_uid, search_folders, structured
from cryo2d.io.mrc import _is_file, _one_line
from cryo2d.io.outputs import atomic_path, write_text_atomic
from cryo2d.particles import ParticleSet

# The CryoSPARC version whose exported result groups (.csg) the ones written here follow:
# the group, its slots (metafile, num_items, type) and these top-level keys.
_CSG_VERSION = "v4.4.1"


def result_group_text(
    cs_name: str, fields: Sequence[str], n_items: int, created: datetime | None = None, kind: str = "particle"
) -> str:
    """The CryoSPARC result group (``.csg``) of a ``.cs`` file: what "Import Result Group" reads.

    A ``.csg`` is the small YAML file CryoSPARC writes beside the ``.cs``
    files of an exported result (Export in a job's Outputs). It names the
    group (type ``particle``, or ``template`` for class averages) and, for
    each of its slots, the ``.cs`` file that holds the slot's fields, how
    many rows it has and the slot's type. Each field prefix of the file
    (``blob``, ``ctf``, ``location``, ``alignments2D``, ...) is a slot, all
    in the one file (``'>NAME.cs'``: the file beside the ``.csg``), as in
    CryoSPARC's own exports of a particle stack.

    Parameters
    ----------
    cs_name : str
        File name of the ``.cs`` file, beside the ``.csg``.
    fields : sequence of str
        Its field names (``uid`` and ``SLOT/NAME`` fields).
    n_items : int
        Its number of rows.
    created : datetime, optional
        Time stamp written (default: now).
    kind : str
        The group's type: ``"particle"`` or ``"template"``.

    Returns
    -------
    str
    """
    created = datetime.now() if created is None else created
    stem = Path(cs_name).stem

    def quoted(text: str) -> str:  # YAML: plain when it is a name (as CryoSPARC writes), else single-quoted, ' doubled
        return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", text) else "'" + text.replace("'", "''") + "'"

    slots = sorted({name.split("/", 1)[0] for name in fields if "/" in name})
    lines = [
        f"# A CryoSPARC result group, in the layout of CryoSPARC v4's exports; written by cryo2d {__version__}.",
        f"created: {created.strftime('%Y-%m-%d %H:%M:%S.%f')}",
        "group:",
        f"  description: {n_items} {'particles' if kind == 'particle' else 'class averages'} written by cryo2d",
        f"  name: {quoted(stem)}",
        f"  title: {quoted(stem.replace('_', ' ').capitalize())}",
        f"  type: {quoted(kind)}",
        "results:",
    ]
    for slot in slots:
        lines += [f"  {quoted(slot)}:", f"    metafile: {quoted('>' + cs_name)}", f"    num_items: {n_items}",
                  f"    type: {quoted(kind + '.' + slot)}"]
    lines.append(f"version: {_CSG_VERSION}")
    return "\n".join(lines) + "\n"


def write_templates(
    path: str | os.PathLike, blob_path: str, index: np.ndarray, box: int, pixel_size_angst: float,
    resolution_angst: np.ndarray,
) -> None:
    """Class averages as a CryoSPARC template group: ``path`` (``.cs``) and its ``.csg``.

    Parameters
    ----------
    path : str or PathLike
        The ``.cs`` file to write (atomically); the ``.csg`` (group type
        ``template``, slot ``blob``) goes beside it.
    blob_path : str
        The stack of class averages, as CryoSPARC names it: relative to the
        project folder (:func:`cryo2d.io.cs.project_blob_path`).
    index : (k,) int array
        0-based image of each template in that stack (``blob/idx``): the
        class numbers of the particles' ``alignments2D/class``, as in
        CryoSPARC, where Select 2D keeps a class's ``blob/idx``.
    box : int
        Edge of the averages, px (``blob/shape``).
    pixel_size_angst : float
        Å per pixel (``blob/psize_A``).
    resolution_angst : (k,) float array
        Each class's resolution, Å (``blob/res_A``, what Select 2D shows).

    ``uid``: 64-bit numbers drawn from a generator seeded by the stack's
    name and the indices, so a job written again gets the same ones.
    ``blob/sign`` is 1: the averages are bright protein.
    """
    index = np.asarray(index, dtype=np.int64)
    k, name = len(index), blob_path.encode("utf-8")
    uid = np.random.default_rng([zlib.crc32(name), *index.tolist()]).integers(1, 2**63, k, dtype=np.int64)
    # The fields and types of CryoSPARC's class_averages (blob/path: fixed-length bytes, as in its files).
    out = structured([
        ("uid", uid.astype(np.uint64)),
        ("blob/path", np.full(k, name, dtype=f"S{max(len(name), 1)}")),
        ("blob/idx", index.astype(np.uint32)),
        ("blob/shape", np.full((k, 2), box, dtype=np.uint32)),
        ("blob/psize_A", np.full(k, pixel_size_angst, dtype=np.float32)),
        ("blob/sign", np.ones(k, dtype=np.float32)),
        ("blob/res_A", np.asarray(resolution_angst, dtype=np.float32)),
    ])
    _save_templates(Path(path), out)


def select_templates(source: str | os.PathLike, rows: np.ndarray, path: str | os.PathLike) -> None:
    """Rows ``rows`` (0-based) of the template ``.cs`` file ``source`` as ``path`` and its ``.csg``.

    As CryoSPARC's Select 2D writes ``templates_selected.cs``: the chosen
    classes' rows unchanged, ``blob/idx`` still their class number in the
    classification's stack.
    """
    _save_templates(Path(path), _load(Path(source), str(source))[np.asarray(rows, dtype=np.int64)])


def _save_templates(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    text = result_group_text(path.name, array.dtype.names, len(array), kind="template")
    write_text_atomic(path.with_suffix(".csg"), text)


def read_csg(
    path: str | os.PathLike,
    *,
    project_dir: str | os.PathLike | None = None,
    no_ctf: bool = False,
    open_stacks: bool = True,
) -> ParticleSet:
    """Read the particles of a CryoSPARC result group (``.csg``), every slot from the file it names.

    Parameters
    ----------
    path : str or PathLike
        The ``.csg`` file of a particle group (an exported CryoSPARC output,
        or one that ``cryo2d`` wrote).
    project_dir : str or PathLike, optional
        The CryoSPARC project folder: what ``blob/path`` and a metafile
        without a leading ``>`` are relative to. Default: looked for as
        :func:`cryo2d.io.cs.read_cs` does (its folder, its parent, the
        nearest folder above with a ``project.json``, the current folder):
        from the ``.csg`` for metafiles, from the ``blob`` slot's file for
        ``blob/path``.
    no_ctf, open_stacks : bool
        As for :func:`cryo2d.io.cs.read_cs`.

    Returns
    -------
    ParticleSet
        As :func:`cryo2d.io.cs.read_cs` returns (``kind="cs"``): the rows
        of the ``blob`` slot's file, in its order, with ``uid`` and the
        fields of every slot (``SLOT/*``) from that slot's file, matched by
        ``uid``; fields of a file that the group does not name are left out.
        ``extra["passthrough"]`` lists the other files and the fields taken
        from each; ``extra["metafiles"]`` every file read.

    Raises
    ------
    Cryo2DError
        One line naming the ``.csg``: not YAML or not a result group, not
        particles, no ``blob`` slot, a metafile missing or not a ``.cs``
        file, a slot's fields missing from its file, a file whose rows are
        not ``num_items`` or that lacks a particle's ``uid``.
    """
    path = Path(path)
    label = str(path)
    if not _is_file(path):
        raise Cryo2DError(f"{label}: file not found")
    slots = _slots(path, label)
    files = {}  # resolved metafile -> its array
    located = {}  # slot -> its resolved metafile
    for slot, (metafile, n_items) in slots.items():
        where = located[slot] = _metafile_path(metafile, path, project_dir)
        if where is None:
            raise Cryo2DError(f"{label}: slot {slot}: file {metafile.removeprefix('>')} not found")
        if where not in files:
            files[where] = _load(where, f"{label}: slot {slot}: {where}")
        array = files[where]
        if len(array) != n_items:
            raise Cryo2DError(f"{label}: slot {slot}: {where.name} holds {len(array)} rows, the group says {n_items}")
        if not any(name.startswith(slot + "/") for name in array.dtype.names):
            raise Cryo2DError(f"{label}: slot {slot}: {where.name} has no {slot}/* fields")
    base_file = located["blob"]
    base = files[base_file]
    columns: list[tuple[str, np.ndarray]] = []
    if "uid" in base.dtype.names:
        columns.append(("uid", base["uid"]))
    passthrough: dict[Path, list[str]] = {}
    for slot, where in located.items():
        array = files[where]
        rows = None
        if where != base_file:
            if "uid" not in base.dtype.names or "uid" not in array.dtype.names:
                raise Cryo2DError(f"{label}: slot {slot}: no uid field to match {where.name}'s rows to the particles")
            rows = rows_by_uid(base["uid"], array["uid"])
            if rows is None:
                raise Cryo2DError(f"{label}: slot {slot}: {where.name} does not hold each particle once (matched by uid)")
        names = [name for name in array.dtype.names if name.startswith(slot + "/")]
        columns += [(name, array[name] if rows is None else array[name][rows]) for name in names]
        if where != base_file:
            passthrough.setdefault(where, []).extend(names)
    chosen = dict(columns)  # in the base file's field order, then the other files' fields
    order = [name for name in base.dtype.names if name in chosen] + [n for n in chosen if n not in base.dtype.names]
    merged = structured([(name, chosen[name]) for name in order])
    particles = particles_from_array(merged, path, project_dir=project_dir, no_ctf=no_ctf, open_stacks=open_stacks,
                                     passthrough=list(passthrough.items()), stacks_near=base_file)
    particles.extra["metafiles"] = list(files)
    return particles


def _slots(path: Path, label: str) -> dict[str, tuple[str, int]]:
    """The group's slots: name -> (metafile as written, num_items); checks the group is particles with a blob slot."""
    try:
        group = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise Cryo2DError(f"{label}: not a CryoSPARC result group ({_one_line(err)})") from err
    if not isinstance(group, dict) or not isinstance(group.get("results"), dict) or not group["results"]:
        raise Cryo2DError(f"{label}: not a CryoSPARC result group (no results)")
    about = group.get("group")
    kind = about.get("type") if isinstance(about, dict) else None
    if kind != "particle":
        raise Cryo2DError(f"{label}: a result group of {kind or 'unknown'} type, not particles")
    slots = {}
    for slot, result in group["results"].items():
        metafile = result.get("metafile") if isinstance(result, dict) else None
        n_items = result.get("num_items") if isinstance(result, dict) else None
        if not isinstance(metafile, str) or not metafile.strip(">") or not isinstance(n_items, int) or n_items < 0:
            raise Cryo2DError(f"{label}: slot {slot}: expected a metafile name and a num_items count")
        slots[str(slot)] = (metafile, n_items)
    if "blob" not in slots:
        raise Cryo2DError(f"{label}: no blob slot (the group names no particle images)")
    return slots


def _metafile_path(metafile: str, csg: Path, project_dir: str | os.PathLike | None) -> Path | None:
    """Where a slot's metafile is: beside the ``.csg`` for ``>NAME``, else in the project folder (None: nowhere)."""
    bases = [csg.parent] if metafile.startswith(">") else search_folders(csg, project_dir)
    name = Path(metafile.removeprefix(">"))
    candidates = [name] if name.is_absolute() else [base / name for base in bases]
    return next((candidate for candidate in candidates if _is_file(candidate)), None)
