"""Particle files that are still arriving: when is a file (and its stacks) complete?

An extraction job writes particle files (STAR or ``.cs``) and MRC stacks into
a folder while the microscope collects, or appends rows to one growing STAR
file. ``ParticleWatcher`` looks at them again and again and reads a file only
once it is complete:

- its size and modification time have not changed for ``settle_s`` seconds
  (counted from when this process first saw that size and time), and
- every stack it references exists, has been equally still for ``settle_s``,
  and holds every image referenced (MRC header and file size agree).

A file still being written is therefore never read half-way. A file that is
still yet does not parse, or whose settled stack is truncated, is bad input
(``Cryo2DError`` naming it): the settle time is the contract with the writer.
A settled file that holds no particles yet (a growing STAR file's header, its
particle loop still empty) is not: it is waited for, and read again once it
changes.
Hidden files (``.name``) and ``*.tmp`` files, which is how atomic writers name
their work in progress, are ignored, and so are CryoSPARC's
``*passthrough*.cs`` files, which ``read_cs`` reads with the particle file
beside them: a ``.cs`` file is read only once they too have settled. A
missing stack is waited for (and reported in a note), since writers may
write it after the particle file.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cryo2d.ctf import boost_note
from cryo2d.errors import Cryo2DError, NoParticles
from cryo2d.io import open_stack, read_particles
from cryo2d.io.cs import is_passthrough, passthrough_note
from cryo2d.io.mrc import StackRefs, _is_file
from cryo2d.particles import ParticleSet

SUFFIXES = (".star", ".cs")

Signature = tuple[int, int]  # (size in bytes, mtime in ns)


def _is_cs(name: str) -> bool:
    return name.lower().endswith(".cs")


def signature(path: Path) -> Signature | None:
    """(size, mtime_ns) of ``path``, None when it does not exist (or cannot be seen)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


def row_keys(particles: ParticleSet, rows: np.ndarray) -> list[str]:
    """The image reference of each row as its file writes it (``000001@stack.mrcs`` or ``stack.mrcs:0``)."""
    stack = particles.stack
    names = np.asarray(stack.names, dtype=object)
    file_index, image_index = stack.file_index[rows], stack.image_index[rows]
    if stack.index_base == 1:
        return [f"{i + 1:06d}@{n}" for n, i in zip(names[file_index], image_index)]
    return [f"{n}:{i}" for n, i in zip(names[file_index], image_index)]


def rows_digest(particles: ParticleSet, start: int, stop: int) -> str:
    """SHA-1 of the image references of rows [start, stop): tells whether rows were rewritten."""
    text = "\n".join(row_keys(particles, np.arange(start, stop)))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class ParticleWatcher:
    """Finds complete particle files in a folder, or the complete state of one growing file.

    Parameters
    ----------
    source : Path
        A folder (every ``*.star`` / ``*.cs`` in it, not in sub-folders) or
        one ``.star`` / ``.cs`` file that grows.
    settle_s : float
        Seconds a file and its stacks must stay unchanged before it is read.
    project_dir : Path, optional
        For ``.cs`` files: the folder ``blob/path`` is relative to.
    no_ctf : bool
        Read no CTF parameters.
    clock : callable
        Seconds, monotonic (tests may pass a fake clock).

    Attributes
    ----------
    sets : dict of str to ParticleSet
        Per file name (relative to the folder), the latest complete read,
        stacks opened.
    read_signature : dict of str to (int, int)
        The file's size and mtime at that read.
    empty_signature : dict of str to (int, int)
        Files not read yet that held no particles when last looked at, with
        their size and mtime then (looked at again once these change).
    """

    def __init__(self, source: str | os.PathLike, *, settle_s: float, project_dir=None, no_ctf: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = Path(source)
        if self.source.is_dir():
            self.folder = self.source
        elif _is_file(self.source):
            if self.source.suffix.lower() not in SUFFIXES:
                raise Cryo2DError(f"{self.source}: not a particle file (expected a folder, .star or .cs)")
            self.folder = self.source.parent
        else:
            raise Cryo2DError(f"{self.source}: no such folder or file")
        self.settle_s = float(settle_s)
        self.project_dir = project_dir
        self.no_ctf = no_ctf
        self._boost_noted = False
        self.clock = clock
        self.sets: dict[str, ParticleSet] = {}
        self.read_signature: dict[str, Signature] = {}
        self.empty_signature: dict[str, Signature] = {}
        self._first_seen: dict[Path, tuple[Signature, float]] = {}
        self._notes_given: set[str] = set()
        self._changed = False
        self._settling = False

    def names(self) -> list[str]:
        """Particle files present now (names relative to the folder), sorted."""
        if not self.source.is_dir():
            return [self.source.name]
        try:
            entries = list(os.scandir(self.folder))
        except OSError as err:
            raise Cryo2DError(f"{self.folder}: cannot list folder ({err.strerror})") from err
        return sorted(
            e.name for e in entries
            if e.name.lower().endswith(SUFFIXES) and not e.name.startswith(".") and e.is_file()
            and not is_passthrough(e.name)
        )

    def path(self, name: str) -> Path:
        return self.folder / name

    def _settled(self, path: Path, still_since: os.stat_result | None = None) -> bool:
        """Whether ``path`` exists and has kept its size and mtime for ``settle_s``.

        A path new or changed since the last look, or still within its
        settle time, makes this poll's source not idle.

        ``still_since``: the stat of a file on the same file system that has
        kept its size and mtime for ``settle_s`` (the particle file naming
        this stack). A path last modified before it (its mtime older, by the
        same file server's clock) has been still at least as long, however
        recently this process first saw it: a stack written before its STAR
        file is read with it, not ``settle_s`` later (a STAR file rewritten
        every 1-2 settle times, each time naming a new stack, was never read).
        """
        sig, now = signature(path), self.clock()
        seen = self._first_seen.get(path)
        if sig is None:
            self._first_seen.pop(path, None)
            return False
        if seen is None or seen[0] != sig:
            self._first_seen[path] = (sig, now)
            self._changed = True
            return self._older(path, sig, still_since)
        if now - seen[1] < self.settle_s and not self._older(path, sig, still_since):
            self._settling = True  # seen and complete soon, perhaps: not idle
            return False
        return True

    @staticmethod
    def _older(path: Path, sig: Signature, still_since: os.stat_result | None) -> bool:
        """Whether ``path`` (of signature ``sig``) was last modified before ``still_since``, on its file system."""
        if still_since is None or not sig[1] < still_since.st_mtime_ns:  # strictly: coarse mtimes tie
            return False
        try:
            return os.stat(path).st_dev == still_since.st_dev  # one server's clock
        except (OSError, ValueError):
            return False

    def _note(self, text: str, notes: list[str]) -> None:
        if text not in self._notes_given:
            self._notes_given.add(text)
            notes.append(text)

    def _passthrough_settled(self) -> bool:
        """Whether every CryoSPARC passthrough file in the folder has settled (a .cs file is read with them)."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return True
        return all([self._settled(self.folder / n) for n in names if is_passthrough(n)])  # each one's clock starts

    def _stacks_ready(self, refs: StackRefs, name: str, notes: list[str], still_since: os.stat_result | None) -> bool:
        ready = True
        for stack_name, places in zip(refs.names, refs.candidates):
            found = next((p for p in places if _is_file(p)), None)
            if found is None:
                self._note(f"{name}: waiting for stack {stack_name}", notes)
                ready = False
            elif not self._settled(found, still_since):
                ready = False
        return ready

    def poll(self) -> tuple[list[str], bool]:
        """Look at every file once; read those that are complete and new or changed.

        Returns
        -------
        notes : list of str
            New one-line remarks (each given once), e.g. a stack waited for.
        changed : bool
            Whether any file or stack was new or changed since the last poll,
            or has not yet stayed unchanged for ``settle_s`` (the source is
            not idle: a later poll may read it).

        Raises
        ------
        Cryo2DError
            A settled file that cannot be read, or whose stacks are bad. A
            settled file not read before that holds no particles is not an
            error: it is noted, and read again once it changes.
        """
        notes: list[str] = []
        self._changed = self._settling = False
        for name in self.names():
            path = self.path(name)
            sig = signature(path)
            if sig is None or sig == self.read_signature.get(name) or sig == self.empty_signature.get(name):
                continue
            settled = self._settled(path)
            if _is_cs(name):  # read with its passthrough files: their clocks start with its own
                settled = self._passthrough_settled() and settled
            if not settled:
                continue
            particles = self._read(name, sig, notes)
            if particles is None:
                continue
            try:  # the file as read, still for settle_s: stacks modified before it are too
                still = os.stat(path)
            except (OSError, ValueError):
                still = None
            if still is not None and (still.st_size, still.st_mtime_ns) != sig:
                self._changed = True  # changed while it was read: read again once it settles (not idle)
                continue
            if not self._stacks_ready(particles.stack, name, notes, still):
                continue
            self.sets[name] = open_stack(particles)
            self.read_signature[name] = sig
            if (through := passthrough_note(particles)) is not None:
                self._note(f"{name}: {through}", notes)
            note = None if self.no_ctf or self._boost_noted else boost_note(particles.ctf, particles.pixel_size_angst)
            if note:  # once a stream: its files come from one export
                self._boost_noted = True
                self._note(f"{name}: {note}", notes)
        return notes, self._changed or self._settling

    def _read(self, name: str, sig: Signature, notes: list[str]) -> ParticleSet | None:
        """The settled file's particles (stacks not opened); None when a file not read before has none yet."""
        path = self.path(name)
        try:
            particles = read_particles(path, project_dir=self.project_dir, no_ctf=self.no_ctf, open_stacks=False)
        except NoParticles:
            # A growing file's header before its first row: nothing yet. Rows once read and now gone: an error.
            if name in self.sets:
                raise
            self.empty_signature[name] = sig
            self._note(f"{name}: no particles yet, waiting", notes)
            return None
        self.empty_signature.pop(name, None)
        return particles
