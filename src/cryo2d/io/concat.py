"""Several particle files as one ``ParticleSet`` (streaming input arrives in pieces).

``concat_particles`` joins sets read from different STAR or ``.cs`` files
(an extraction job writes one per micrograph or per batch) into one set whose
rows are the inputs' rows in order. Images stay where they are: the joined
set's stack is a ``ConcatStack`` that hands each request on to the stack the
particle came from.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryo2d.errors import Cryo2DError
from cryo2d.particles import CTFParams, ImageSource, ParticleSet


class ConcatStack:
    """An ``ImageSource`` made of several others, one after the other.

    Parameters
    ----------
    sources : sequence of ImageSource
        Stacks with the same box size; particle ``i`` of the joined stack is
        particle ``i - offset[j]`` of the source ``j`` that holds it.
    """

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        assert len(sources) > 0
        self.sources = list(sources)
        self.box = int(self.sources[0].box)
        assert all(int(s.box) == self.box for s in self.sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _read(self, idx: np.ndarray, method: str) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.box, self.box), dtype=np.float32)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            source = self.sources[j]
            read = getattr(source, method, source.read)
            out[sel] = read(idx[sel] - self.offsets[j])
        return out

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` (0-based) as (b, box, box) float32; Cryo2DError on NaN/Inf (from the source)."""
        return self._read(idx, "read")

    def read_unchecked(self, idx: np.ndarray) -> np.ndarray:
        """Like ``read`` but without the NaN/Inf check where the sources offer that."""
        return self._read(idx, "read_unchecked")

    def inverted(self) -> "ConcatStack":
        """The same images with their contrast inverted (each source inverted)."""
        return ConcatStack([s.inverted() for s in self.sources])


def _merge_optics(sets: Sequence[ParticleSet]) -> pd.DataFrame | None:
    """One ``data_optics`` table for all sets; a group number defined two ways is an error."""
    tables = [p.extra.get("optics") for p in sets]
    if all(t is None for t in tables):
        return None
    first = sets[0]
    merged = tables[0]
    for p, table in zip(sets[1:], tables[1:]):
        if table is None or list(table.columns) != list(merged.columns):
            raise Cryo2DError(f"{p.source}: data_optics columns differ from those of {first.source}")
        both = pd.concat([merged, table], ignore_index=True).drop_duplicates(ignore_index=True)
        groups = both["rlnOpticsGroup"]
        if groups.duplicated().any():
            group = groups[groups.duplicated()].iloc[0]
            raise Cryo2DError(f"{p.source}: optics group {group} differs from the one in {first.source}")
        merged = both
    return merged


def concat_particles(sets: Sequence[ParticleSet], source: str | Path) -> ParticleSet:
    """Join particle sets read from several files of one kind into one set.

    Parameters
    ----------
    sets : sequence of ParticleSet
        Read by ``read_particles`` (stacks opened), all ``.star`` or all
        ``.cs``, with the same box and the same particle columns (STAR) or
        fields (``.cs``); all with CTF or all without.
    source : str or Path
        What the joined set names as its source (e.g. the watched folder).

    Returns
    -------
    ParticleSet
        Rows of ``sets[0]``, then ``sets[1]``, ...; ``table`` index
        renumbered from 0. STAR: one ``data_optics`` (the union of the
        files' groups). ``.cs``: ``extra["cs_array"]`` concatenated.

    Raises
    ------
    Cryo2DError
        Naming the file that does not match the first: other kind, box,
        columns, CTF presence, optics group or ``.cs`` dtype.
    """
    assert len(sets) > 0
    first = sets[0]
    for p in sets[1:]:
        if p.kind != first.kind:
            raise Cryo2DError(f"{p.source}: a {p.kind} file cannot join the {first.kind} file {first.source}")
        if p.box != first.box:
            raise Cryo2DError(f"{p.source}: mixed box sizes: {p.box} px images, {first.source} has {first.box} px")
        if list(p.table.columns) != list(first.table.columns):
            raise Cryo2DError(f"{p.source}: particle columns differ from those of {first.source}")
        if (p.ctf is None) != (first.ctf is None):
            raise Cryo2DError(f"{p.source}: CTF parameters present in only one of it and {first.source}")
    ctf = None
    if first.ctf is not None:
        ctf = CTFParams(**{k: np.concatenate([getattr(p.ctf, k) for p in sets]) for k in first.ctf.__dict__})
    table = pd.concat([p.table for p in sets], ignore_index=True)
    extra = dict(first.extra)
    if first.kind == "star":
        if len({p.extra.get("star_version") for p in sets}) > 1:
            raise Cryo2DError(f"{source}: RELION 3.0 and 3.1 STAR files mixed")
        optics = _merge_optics(sets)
        block = first.extra.get("particles_block", "particles")
        blocks = dict(first.extra.get("blocks") or {})
        if optics is not None:
            blocks["optics"] = optics
        blocks[block] = table
        extra.update(optics=optics, blocks=blocks)
    elif first.kind == "cs":
        arrays = [p.extra["cs_array"] for p in sets]
        for p, array in zip(sets[1:], arrays[1:]):
            if not _same_fields(array.dtype, arrays[0].dtype):
                raise Cryo2DError(f"{p.source}: .cs fields differ from those of {first.source}")
        extra["cs_array"] = np.concatenate(arrays)
    return ParticleSet(
        stack=ConcatStack([p.stack for p in sets]),
        ctf=ctf,
        pixel_size_angst=np.concatenate([np.asarray(p.pixel_size_angst, dtype=np.float64) for p in sets]),
        table=table,
        source=Path(source),
        kind=first.kind,
        extra=extra,
        prior_shift_px=_joined_shifts(sets),
    )


def _same_fields(a: np.dtype, b: np.dtype) -> bool:
    """Two .cs files' fields are one set's: the same names and types, byte and text strings of any width.

    numpy stores a string field as wide as the file's longest value (blob/path of the J9 and J150
    extractions: S66, S67) and widens it when joining; it would also turn numbers into strings.
    """
    if a.names != b.names:
        return False
    for name in a.names:
        x, y = a[name], b[name]
        if x != y and not (x.shape == y.shape and x.base.kind == y.base.kind and x.base.kind in "SU"):
            return False
    return True


def _joined_shifts(sets: Sequence[ParticleSet]) -> np.ndarray | None:
    """The sets' ``prior_shift_px`` in order (zeros for a set without), None if no set has any."""
    if all(p.prior_shift_px is None for p in sets):
        return None
    return np.concatenate([np.zeros((len(p), 2)) if p.prior_shift_px is None else p.prior_shift_px for p in sets])
