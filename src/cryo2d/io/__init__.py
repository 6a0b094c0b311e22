"""File formats: RELION STAR, CryoSPARC .cs and result groups (.csg), MRC stacks and maps, atomic outputs.

``read_particles`` is the one entry point for particle files: it picks the
reader from the suffix, checks what every format must satisfy (at least one
particle, positive finite pixel sizes, usable CTF values) and then opens the
image stacks.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from cryo2d.errors import Cryo2DError, NoParticles
from cryo2d.io.cs import read_cs, write_cs
from cryo2d.io.csg import read_csg
from cryo2d.io.mrc import ArrayStack, MRCStack, StackRefs, check_finite, nonfinite_indices, read_map, write_stack
from cryo2d.io.outputs import atomic_path, make_output_folder, write_json_atomic, write_text_atomic
from cryo2d.io.star import open_star_stacks, read_star, write_star
from cryo2d.particles import Assignments, ParticleSet

__all__ = [
    "ArrayStack", "MRCStack", "StackRefs", "atomic_path", "check_finite", "nonfinite_indices",
    "make_output_folder", "open_stack", "read_cs", "read_csg", "read_map", "read_particles", "read_star", "write_cs",
    "write_json_atomic", "write_particles", "write_stack", "write_star", "write_text_atomic",
]


def read_particles(
    path: str | os.PathLike,
    *,
    project_dir: str | os.PathLike | None = None,
    no_ctf: bool = False,
    open_stacks: bool = True,
) -> ParticleSet:
    """Read a particle file (``.star``, ``.cs`` or ``.csg``) and validate it.

    Parameters
    ----------
    path : str or PathLike
        RELION STAR (3.0 or 3.1+), CryoSPARC ``.cs``, or a CryoSPARC result
        group ``.csg`` (an exported output: its slots' ``.cs`` files merged).
    project_dir : str or PathLike, optional
        The project folder that relative image paths start from: CryoSPARC's
        for ``.cs`` and ``.csg`` ``blob/path``; RELION's for a STAR file's
        ``_rlnImageName`` (looked in first, before the STAR file's folder and
        the current folder).
    no_ctf : bool
        Read no CTF (``ctf`` is None); otherwise missing CTF data is an error.
    open_stacks : bool
        Open and check every MRC stack (header, size, image numbers, box);
        False reads only the metadata (``stack`` is a ``StackRefs``; open it
        later with ``open_stack``).

    Returns
    -------
    ParticleSet
        No pixels are read: images come later, in chunks, via ``stack.read``.

    Raises
    ------
    Cryo2DError
        One line naming the file: unknown suffix, unreadable file, missing
        columns/fields, no particles, bad pixel size or CTF values, and (with
        ``open_stacks``) any stack problem. NaN/Inf pixels are found by
        ``check_finite`` or on ``read``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        particles = read_star(path, no_ctf=no_ctf, open_stacks=False, project_dir=project_dir)
    elif suffix == ".cs":
        particles = read_cs(path, project_dir=project_dir, no_ctf=no_ctf, open_stacks=False)
    elif suffix == ".csg":
        particles = read_csg(path, project_dir=project_dir, no_ctf=no_ctf, open_stacks=False)
    elif path.is_dir():
        found = [name for name in ("particles.star", "particles.cs") if (path / name).is_file()]
        hint = f" (did you mean {path / found[0]}?)" if found else ""
        raise Cryo2DError(f"{path}: a folder, not a particle file (.star or .cs){hint}")
    else:
        expected = "expected .star, .cs or .csg"
        raise Cryo2DError(f"{path}: unknown particle file type {suffix or '(no suffix)'!r} ({expected})")
    _validate(particles)
    return open_stack(particles) if open_stacks else particles


def open_stack(particles: ParticleSet) -> ParticleSet:
    """``particles`` with its ``StackRefs`` replaced by a validated ``MRCStack``."""
    if isinstance(particles.stack, StackRefs):
        if particles.kind == "star":
            return open_star_stacks(particles)
        return replace(particles, stack=particles.stack.open())
    return particles


def _validate(particles: ParticleSet) -> None:
    label = str(particles.source)
    if len(particles) == 0:
        raise NoParticles(f"{label}: no particles")
    _check_values(label, "pixel size", particles.pixel_size_angst, minimum=0.0)
    ctf = particles.ctf
    if ctf is None:
        return
    for field, values in ctf.__dict__.items():
        _check_values(label, field, values)
    _check_values(label, "voltage_kv", ctf.voltage_kv, minimum=0.0)
    amplitude = ctf.amplitude_contrast
    if ((amplitude < 0) | (amplitude >= 1)).any():
        i = int(np.argmax((amplitude < 0) | (amplitude >= 1)))
        raise Cryo2DError(f"{label}: amplitude contrast {amplitude[i]} of particle {i + 1} is not in [0, 1)")


def _check_values(label: str, what: str, values: np.ndarray, minimum: float | None = None) -> None:
    """Every value finite (and > ``minimum`` when given), else a one-line error."""
    bad = ~np.isfinite(values)
    if minimum is not None:
        bad |= ~(values > minimum)
    if bad.any():
        i = int(np.argmax(bad))
        limit = f" and > {minimum:g}" if minimum is not None else ""
        raise Cryo2DError(f"{label}: {what} of particle {i + 1} is {values[i]} (must be finite{limit})")


def write_particles(
    particles: ParticleSet,
    path: str | os.PathLike,
    assignments: Assignments | None = None,
    rows: np.ndarray | None = None,
) -> None:
    """Write ``particles`` back in their own format (``write_star`` or ``write_cs``), atomically."""
    if particles.kind == "star":
        write_star(particles, path, assignments=assignments, rows=rows)
    elif particles.kind == "cs":
        write_cs(particles, path, assignments=assignments, rows=rows)
    else:
        raise ValueError(f"unknown particle set kind {particles.kind!r}")
