"""MRC image stacks, read image by image, and single maps/stacks written whole.

``MRCStack`` is the ``ImageSource`` the engine reads particles from: it
validates each stack's header once and then reads only the images asked for
with explicit file reads (no memory map, whose touched pages would count in
the process's resident memory), so a dataset larger than memory is never
loaded. ``StackRefs``
holds the same references before any file is opened (the STAR/.cs readers
return it when asked not to open stacks); ``ArrayStack`` wraps an in-memory
array for tests and simulations.
"""
from __future__ import annotations

import copy
import io
import itertools
import math
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import mrcfile
import mrcfile.dtypes
import mrcfile.utils
import numpy as np

from cryo2d.errors import Cryo2DError
from cryo2d.io.outputs import atomic_path

HEADER_BYTES = 1024
MAX_OPEN_FILES = 64  # per MRCStack


def _open_files_budget() -> int:
    """Stack files the process keeps open at most: 256, or a quarter of its descriptor limit where
    that is lower (macOS allows 256 by default), at least 16."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no such limit here (Windows)
        return 256
    return 256 if soft == resource.RLIM_INFINITY else max(16, min(256, soft // 4))


# Over all MRCStacks of the process: a stream keeps one set, and one MRCStack, per particle file (RELION
# writes a STAR file and a stack per micrograph), and each stack's own cap alone let 1,100 such files hold
# 1,100 descriptors, past the 1,024 that Linux allows a process by default ("Too many open files").
MAX_OPEN_FILES_TOTAL = _open_files_budget()
_open_files: OrderedDict[tuple[int, int], weakref.ref] = OrderedDict()  # (stack token, file no.) -> stack
_open_files_lock = threading.Lock()
_tokens = itertools.count()


@dataclass(frozen=True)
class _StackFile:
    """What the header of one stack file says (validated)."""

    n_images: int
    ny: int
    nx: int
    strict: bool  # passed mrcfile's permissive=False checks (False: old file without map ID)
    dtype: np.dtype = np.dtype(np.float32)  # of the data block, byte order included (mrcfile's)
    offset: int = HEADER_BYTES  # where the data block starts: header + extended header, bytes


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False (not an error) for names the OS cannot take (too long, NUL)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _check_extended_header(path: Path, label: str, name: str) -> bool:
    """Refuse a header whose extended-header size runs past the end of the file.

    ``mrcfile`` allocates the extended header (``nsymbt`` bytes, up to 2 GiB)
    before it can tell the file is too short, so this reads the 1024-byte
    header itself, in the byte order ``mrcfile``'s permissive reader picks.

    Returns
    -------
    bool
        Whether the strict reader may open the file: it reads ``nsymbt`` in
        the machine stamp's byte order, which differs when the stamp is wrong.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as err:
        raise Cryo2DError(f"{label}: {name} cannot be read ({_one_line(err)})") from err
    if len(raw) < HEADER_BYTES:
        raise Cryo2DError(f"{label}: {name} is not an MRC file (shorter than the {HEADER_BYTES}-byte header)")
    header = np.frombuffer(raw, dtype=mrcfile.dtypes.HEADER_DTYPE).reshape(())
    try:
        stamp = mrcfile.utils.byte_order_from_machine_stamp(header["machst"])
    except ValueError:
        stamp = None  # the strict reader stops here, before the extended header
    permissive = header.view(header.dtype.newbyteorder(stamp or "<"))
    try:
        mrcfile.utils.dtype_from_mode(permissive["mode"])
    except ValueError:  # mrcfile then tries the other byte order
        flipped = permissive.view(permissive.dtype.newbyteorder())
        try:
            mrcfile.utils.dtype_from_mode(flipped["mode"])
            permissive = flipped
        except ValueError:
            pass
    room = size - HEADER_BYTES
    nsymbt = int(permissive["nsymbt"])
    if nsymbt > room:
        raise Cryo2DError(
            f"{label}: {name} is not an MRC file or is truncated (its header says {nsymbt} bytes "
            f"of extended header, the file has {size} bytes in all)"
        )
    return stamp is None or int(header.view(header.dtype.newbyteorder(stamp))["nsymbt"]) <= room


def inspect_mrc(path: Path, label: str, name: str | None = None) -> _StackFile:
    """Validate an MRC file's header and size without reading its data.

    A file that fails ``mrcfile``'s strict checks (``permissive=False``,
    warnings as errors) is still accepted when its header gives a valid data
    mode and shape and the file size matches it exactly: old RELION stacks
    have no map ID. Anything else is refused, as are complex modes (3, 4).
    Nothing the header declares is allocated before it is checked against
    the file size.

    Raises
    ------
    Cryo2DError
        ``"{label}: {name} is not an MRC file (...)"`` or ``"... is truncated (...)"``.
    """
    name = name or str(path)
    strict_error = None if _check_extended_header(path, label, name) else "machine stamp does not match the data"
    try:
        if strict_error is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
                    header = mrc.header.copy()
    except (ValueError, Warning, OSError) as err:
        strict_error = _one_line(err)
    try:
        if strict_error is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                    header = mrc.header.copy()
        shape = mrcfile.utils.data_shape_from_header(header)
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except (ValueError, OSError, ZeroDivisionError) as err:  # ZeroDivisionError: volume stack with mz = 0
        raise Cryo2DError(f"{label}: {name} is not an MRC file ({strict_error or _one_line(err)})") from err
    dims = "x".join(map(str, shape))
    if min(shape) < 0 or min(shape[-2:]) < 1:
        raise Cryo2DError(f"{label}: {name} is not an MRC file (its header says {dims} pixels)")
    if dtype.kind == "c":
        raise Cryo2DError(f"{label}: {name} holds complex numbers (mode {int(header.mode)}), not real images")
    # math.prod: exact integers (np.prod wraps around for headers like 2^30 x 2^30 x 2^30).
    expected = HEADER_BYTES + int(header.nsymbt) + math.prod(shape) * dtype.itemsize
    size = os.path.getsize(path)
    if strict_error is not None and (size > expected or min(shape) < 1 or int(header.nsymbt) < 0):
        raise Cryo2DError(f"{label}: {name} is not an MRC file ({strict_error})")
    if size < expected:
        raise Cryo2DError(
            f"{label}: {name} is truncated (its header says {dims} {dtype.name} "
            f"= {expected} bytes, the file has {size})"
        )
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise Cryo2DError(f"{label}: {name} is a stack of volumes, not of images (shape {shape})")
    return _StackFile(
        n_images=int(shape[0]), ny=int(shape[1]), nx=int(shape[2]), strict=strict_error is None,
        dtype=dtype, offset=HEADER_BYTES + int(header.nsymbt),
    )


class MRCStack:
    """Particle images from one or more MRC stacks, read image by image.

    Parameters
    ----------
    files : sequence of Path
        The distinct stack files (existing paths).
    file_index : (n,) int array
        For each particle, its file's position in ``files``.
    image_index : (n,) int array
        For each particle, the 0-based image number in its file.
    label : str
        Name used at the start of error messages (the STAR/.cs file).
    names : sequence of str, optional
        The files as the metadata spells them (default: ``files``).
    index_base : int
        1 to name images as STAR does (``000001@stack.mrcs``), 0 for .cs.
    sign : (n,) float array, optional
        Per particle, a factor (+1 or -1) on its image as read: the contrast
        that makes the protein bright (``StackRefs.sign``). None: as stored.

    Raises
    ------
    Cryo2DError
        At construction: a missing, non-MRC or truncated file; an image
        number past the end of its stack; non-square images; box sizes that
        differ between stacks. ``read`` raises for NaN/Inf pixels.

    Notes
    -----
    Every header is checked at construction (files are opened and closed);
    files are then opened on first read and at most ``MAX_OPEN_FILES`` stay
    open (least recently used are closed). Images are read with positioned
    reads (``os.preadv``), one per run of consecutive image numbers, in the
    data type and byte order the header gives (as ``mrcfile`` reads them),
    then converted to float32. No method reads a whole stack, and nothing is
    memory-mapped: resident memory does not grow with the images read.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        file_index: np.ndarray,
        image_index: np.ndarray,
        *,
        label: str = "",
        names: Sequence[str] | None = None,
        index_base: int = 0,
        sign: np.ndarray | None = None,
    ) -> None:
        self.files = [Path(f) for f in files]
        self.names = [str(n) for n in names] if names is not None else [str(f) for f in self.files]
        self.file_index = np.asarray(file_index, dtype=np.int64)
        self.image_index = np.asarray(image_index, dtype=np.int64)
        self.index_base = index_base
        assert len(self.names) == len(self.files)
        assert self.file_index.shape == self.image_index.shape and self.file_index.ndim == 1
        self.sign = None if sign is None else np.asarray(sign, dtype=np.float32)
        assert self.sign is None or self.sign.shape == self.file_index.shape
        self.label = label or (self.names[0] if self.names else "stack")
        self._strict: list[bool] = []
        self._layout: list[tuple[np.dtype, int, int]] = []  # per file: data dtype, data offset, images
        self.box = self._validate()
        self._handles: OrderedDict[int, io.FileIO] = OrderedDict()
        self._lock = threading.Lock()
        self._token = next(_tokens)  # this stack's key in the process-wide list of open files

    @classmethod
    def from_paths(
        cls, paths: Sequence[str | os.PathLike], indices: np.ndarray, **kwargs
    ) -> "MRCStack":
        """Build from per-particle stack paths (n,) and 0-based indices (n,)."""
        codes, uniques = _factorize([str(p) for p in paths])
        return cls(uniques, codes, indices, **kwargs)

    def __len__(self) -> int:
        return len(self.file_index)

    def _describe(self, file_no: int, image0: int) -> str:
        if self.index_base == 1:
            return f"image {image0 + 1:06d}@{self.names[file_no]}"
        return f"image {image0} of {self.names[file_no]}"

    def _validate(self) -> int:
        box = None
        first_name = None
        last_image = np.full(len(self.files), -1, dtype=np.int64)
        if len(self.file_index):
            np.maximum.at(last_image, self.file_index, self.image_index)
        if len(self.image_index) and self.image_index.min() < 0:
            i = int(np.argmin(self.image_index))
            raise Cryo2DError(f"{self.label}: {self._describe(self.file_index[i], self.image_index[i])} is not a valid image number")
        for file_no, (path, name) in enumerate(zip(self.files, self.names)):
            if not _is_file(path):
                raise Cryo2DError(f"{self.label}: stack file {name} not found")
            info = inspect_mrc(path, self.label, name)
            self._strict.append(info.strict)
            self._layout.append((info.dtype, info.offset, info.n_images))
            if info.nx != info.ny:
                raise Cryo2DError(f"{self.label}: {name} has non-square images ({info.nx}x{info.ny} px)")
            if box is None:
                box, first_name = info.nx, name
            elif info.nx != box:
                raise Cryo2DError(
                    f"{self.label}: mixed box sizes: {first_name} has {box} px images, {name} has {info.nx} px"
                )
            if last_image[file_no] >= info.n_images:
                raise Cryo2DError(
                    f"{self.label}: {self._describe(file_no, int(last_image[file_no]))} is past the end "
                    f"of {name} ({info.n_images} images)"
                )
        return int(box or 0)

    def _file(self, file_no: int) -> io.FileIO:
        """The open (unbuffered) file ``file_no`` (called with ``self._lock`` held).

        Closes this stack's least recently used file past ``MAX_OPEN_FILES``,
        and other stacks' least recently used files past ``MAX_OPEN_FILES_TOTAL``
        in the whole process (see :func:`_note_open`).
        """
        handle = self._handles.get(file_no)
        if handle is None:
            handle = open(self.files[file_no], "rb", buffering=0)
            self._handles[file_no] = handle
            while len(self._handles) > min(MAX_OPEN_FILES, MAX_OPEN_FILES_TOTAL):
                old_no, old = self._handles.popitem(last=False)
                old.close()
                _forget_open(self._token, old_no)
        else:
            self._handles.move_to_end(file_no)
        _note_open(self, file_no)
        return handle

    def _read_images(self, file_no: int, images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``images`` (sorted, distinct 0-based numbers) of file ``file_no`` in its dtype.

        One positioned read per run of consecutive numbers. ``out``, when
        given, is a C-contiguous (len(images), box, box) array of the file's
        dtype that the images are read into (and returned).
        """
        dtype, offset, _ = self._layout[file_no]
        image_bytes = self.box * self.box * dtype.itemsize
        block = np.empty((len(images), self.box, self.box), dtype=dtype) if out is None else out
        raw = memoryview(block.reshape(-1).view(np.uint8))
        handle = self._file(file_no)
        starts = np.flatnonzero(np.diff(images, prepend=-2) != 1)
        for first, last in zip(starts, [*starts[1:], len(images)]):
            view = raw[int(first) * image_bytes:int(last) * image_bytes]
            if _read_at(handle, view, offset + int(images[first]) * image_bytes) < len(view):
                raise Cryo2DError(
                    f"{self.label}: {self.names[file_no]} is truncated (it ended while reading "
                    f"{self._describe(file_no, int(images[last - 1]))})"
                )
        return block

    def read_unchecked(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Like ``read`` but without the NaN/Inf check; ``out``: a (len(idx), box, box) float32 array to fill."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(idx), self.box, self.box), dtype=np.float32)
        file_of = self.file_index[idx]
        order = np.argsort(file_of, kind="stable")
        bounds = np.flatnonzero(np.diff(file_of[order])) + 1
        with self._lock:
            for group in np.split(order, bounds):
                if len(group) == 0:
                    continue
                file_no = int(file_of[group[0]])
                images, inverse = np.unique(self.image_index[idx[group]], return_inverse=True)
                inverse = inverse.reshape(-1)
                in_order = len(images) == len(group) and (np.diff(group) == 1).all() and (np.diff(inverse) > 0).all()
                if in_order and self._layout[file_no][0] == np.float32 and out.flags.c_contiguous:
                    # The common case: float32 images in order, read straight into their slice. A second
                    # array and its copy cost as much as the read (1,024 images of 256 px: 0.68 s each
                    # when the memory is fresh, as page faults are slow on this host).
                    self._read_images(file_no, images, out[group[0]:group[-1] + 1])
                    continue
                block = self._read_images(file_no, images)
                if in_order:
                    out[group[0]:group[-1] + 1] = block
                else:
                    out[group] = block[inverse]
        if self.sign is not None:
            out *= self.sign[idx][:, None, None]
        return out

    def inverted(self) -> "MRCStack":
        """The same images with their contrast inverted (multiplied by -1), sharing no open files
        (a copy goes through ``__getstate__``/``__setstate__``)."""
        other = copy.copy(self)
        other.sign = _negated(self.sign, len(self))
        return other

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` (0-based particle indices) as (b, box, box) float32.

        Raises
        ------
        Cryo2DError
            If any image read has NaN or Inf pixels (names the first one).
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return self._checked(idx, self.read_unchecked(idx))

    def _checked(self, idx: np.ndarray, images: np.ndarray) -> np.ndarray:
        """``images`` (of particles ``idx``), or Cryo2DError naming the first with NaN/Inf pixels."""
        bad = _first_nonfinite(images)
        if bad is not None:
            i = idx[bad]
            raise Cryo2DError(
                f"{self.label}: {self._describe(self.file_index[i], self.image_index[i])} has NaN/Inf pixels"
            )
        return images

    def close(self) -> None:
        """Close every open file (they reopen on the next read)."""
        with self._lock:
            while self._handles:
                file_no, handle = self._handles.popitem()
                handle.close()
                _forget_open(self._token, file_no)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._token = next(_tokens)  # a copy (``inverted``) opens its own files

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            try:
                handle.close()
            except Exception:  # interpreter shutdown: nothing left to release
                pass


def _note_open(stack: MRCStack, file_no: int) -> None:
    """Mark file ``file_no`` of ``stack`` (open, ``stack._lock`` held) as the most recently used open stack
    file of the process, and close other stacks' least recently used files past ``MAX_OPEN_FILES_TOTAL``.

    A stack being read by another thread (its lock taken) keeps its files
    until a later read finds it free; the lock is only tried, never waited
    for, so two readers cannot block each other. A closed file reopens on
    its stack's next read.
    """
    key = (stack._token, file_no)
    with _open_files_lock:
        if key in _open_files:
            _open_files.move_to_end(key)
        else:
            _open_files[key] = weakref.ref(stack)
        excess = len(_open_files) - MAX_OPEN_FILES_TOTAL
        if excess <= 0:
            return
        for old_key in list(_open_files)[:-1]:
            if excess <= 0:
                break
            other = _open_files[old_key]()
            if other is not None and other is not stack:
                if not other._lock.acquire(blocking=False):
                    continue
                try:
                    handle = other._handles.pop(old_key[1], None)
                    if handle is not None:
                        handle.close()
                finally:
                    other._lock.release()
            if other is not stack:  # gone (its files closed with it) or closed now
                del _open_files[old_key]
                excess -= 1


def _forget_open(token: int, file_no: int) -> None:
    """Take a closed stack file off the process-wide list."""
    with _open_files_lock:
        _open_files.pop((token, file_no), None)


class ArrayStack:
    """An in-memory ``ImageSource`` over an (n, box, box) array (tests, simulations).

    Parameters
    ----------
    images : (n, box, box) array
        Any real dtype; ``read`` returns float32 copies.
    label : str
        Name used in error messages.
    """

    def __init__(self, images: np.ndarray, *, label: str = "in-memory stack") -> None:
        images = np.asarray(images)
        assert images.ndim == 3 and images.shape[1] == images.shape[2], images.shape
        self.images = images
        self.box = int(images.shape[1])
        self.label = label

    def __len__(self) -> int:
        return len(self.images)

    def read_unchecked(self, idx: np.ndarray) -> np.ndarray:
        """Like ``read`` but without the NaN/Inf check."""
        return np.asarray(self.images[np.asarray(idx, dtype=np.int64).reshape(-1)], dtype=np.float32)

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` as (b, box, box) float32; Cryo2DError on NaN/Inf pixels."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = self.read_unchecked(idx)
        bad = _first_nonfinite(out)
        if bad is not None:
            raise Cryo2DError(f"{self.label}: image {idx[bad]} has NaN/Inf pixels")
        return out

    def inverted(self) -> "ArrayStack":
        """The same images with their contrast inverted (multiplied by -1)."""
        return ArrayStack(-np.asarray(self.images, dtype=np.float32), label=self.label)


@dataclass(frozen=True)
class StackRefs:
    """Particle image references before any stack file is opened.

    Attributes
    ----------
    label : str
        The metadata file, for error messages.
    names : list of str
        Distinct stack files as the metadata spells them.
    candidates : list of list of Path
        For each name, the places to look for it, in order.
    file_index, image_index : (n,) int64
        Per particle: position in ``names``, 0-based image number.
    index_base : int
        1 for STAR image names, 0 for .cs ``blob/idx``.
    box : int
        Box size (px) the metadata states, 0 when unknown.
    sign : (n,) float32 or None
        Per particle, the factor (+1 or -1) that makes its image's protein
        bright (RELION's convention): CryoSPARC's ``blob/sign``, -1 for
        images cut from micrographs; None: all +1.
    missing_hint : str
        Said after "stack file ... not found" when the name had several
        places to look: where the format's relative names are relative to.
    """

    label: str
    names: list[str]
    candidates: list[list[Path]]
    file_index: np.ndarray
    image_index: np.ndarray
    index_base: int
    box: int = 0
    sign: np.ndarray | None = None
    missing_hint: str = ""

    def __len__(self) -> int:
        return len(self.file_index)

    def inverted(self) -> "StackRefs":
        """The same references, their images to be read with the contrast inverted."""
        return replace(self, sign=_negated(self.sign, len(self)))

    def read(self, idx: np.ndarray) -> np.ndarray:
        raise Cryo2DError(f"{self.label}: image stacks were not opened")

    def open(self) -> MRCStack:
        """Find and validate the stack files; see ``MRCStack`` for the errors."""
        files = []
        for name, places in zip(self.names, self.candidates):
            found = next((p for p in places if _is_file(p)), None)
            if found is None:
                where = " or ".join(str(p) for p in places)
                hint = f"; {self.missing_hint}" if self.missing_hint and len(places) > 1 else ""
                raise Cryo2DError(f"{self.label}: stack file {name} not found (looked for {where}){hint}")
            files.append(found)
        stack = MRCStack(
            files, self.file_index, self.image_index,
            label=self.label, names=self.names, index_base=self.index_base, sign=self.sign,
        )
        if self.box and stack.box != self.box:  # images rescaled after the metadata was written: its pixel size is off too
            raise Cryo2DError(
                f"{self.label}: the metadata gives {self.box} px images, but {self.names[0]} has {stack.box} px images"
            )
        return stack


def _negated(sign: np.ndarray | None, n: int) -> np.ndarray:
    """-``sign`` for ``n`` images (None: all +1), float32."""
    return -(np.ones(n, dtype=np.float32) if sign is None else sign)


def _factorize(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(codes (n,) int64, uniques in first-seen order)."""
    uniques: dict[str, int] = {}
    codes = np.fromiter((uniques.setdefault(v, len(uniques)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(uniques)


def _read_at(handle: io.FileIO, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``handle`` at byte ``offset``; the number of bytes read (short at end of file).

    ``os.preadv`` leaves the file position alone, so a forked process
    sharing the descriptor cannot interfere; ``seek`` + ``readinto`` where
    the platform lacks it (Windows).
    """
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(handle.fileno(), [view[done:]], offset + done)
        else:
            handle.seek(offset + done)
            got = handle.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def _first_nonfinite(images: np.ndarray) -> int | None:
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    return None if finite.all() else int(np.argmin(finite))


def check_finite(stack, chunk: int = 1024) -> None:
    """Read every image of ``stack`` in chunks; Cryo2DError at the first NaN/Inf.

    Memory stays bounded by ``chunk`` images (chunk × box² × 4 bytes); an
    :class:`MRCStack` is read through one reused buffer (:func:`_unchecked_chunks`).
    """
    if not isinstance(stack, MRCStack):
        for start in range(0, len(stack), chunk):
            stack.read(np.arange(start, min(start + chunk, len(stack))))
        return
    for idx, images in _unchecked_chunks(stack, chunk):
        stack._checked(idx, images)


def nonfinite_indices(stack, chunk: int = 1024) -> np.ndarray:
    """0-based indices (m,) int64 of the images with any NaN/Inf pixel (for ``--skip-bad``)."""
    bad = []
    for idx, images in _unchecked_chunks(stack, chunk):
        finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
        bad.append(idx[~finite])
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def _unchecked_chunks(stack, chunk: int):
    """Yield (idx, images) over every image of ``stack``, ``chunk`` at a time, without the NaN/Inf check.

    An :class:`MRCStack` is read into one buffer of at most 16 MB that every
    chunk reuses (valid until the next chunk): fresh memory costs page faults,
    which took longer than the reads themselves (2,000 images of 256 px:
    1.0-1.5 -> 0.12 s).
    """
    if isinstance(stack, MRCStack):
        chunk = max(1, min(chunk, (16 << 20) // (4 * stack.box * stack.box)))
        buf = np.empty((min(chunk, len(stack)), stack.box, stack.box), dtype=np.float32)

        def read(idx):
            return stack.read_unchecked(idx, out=buf[: len(idx)])
    else:
        read = getattr(stack, "read_unchecked", stack.read)
    for start in range(0, len(stack), chunk):
        idx = np.arange(start, min(start + chunk, len(stack)))
        yield idx, read(idx)


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a 3D density map.

    Returns
    -------
    volume : (n, n, n) float32
        The map, indexed [z, y, x] as stored.
    voxel_size_angst : float
        Voxel size in Å from the header (x); 0.0 when the header has none.
        Headers are often wrong (0 or 1): let the user override it.
    """
    path = Path(path)
    if not _is_file(path):
        raise Cryo2DError(f"{path}: file not found")
    info = inspect_mrc(path, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", permissive=not info.strict) as mrc:
            volume = np.array(mrc.data, dtype=np.float32)
            voxel_size_angst = float(mrc.voxel_size.x)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise Cryo2DError(f"{path}: not a cubic 3D map (shape {volume.shape})")
    if not np.isfinite(volume).all():
        raise Cryo2DError(f"{path}: map has NaN/Inf voxels")
    return volume, voxel_size_angst


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size_angst: float, *, label: str = "cryo2d") -> None:
    """Write (n, box, box) images as a float32 MRC image stack, atomically.

    The header's one label is ``label`` (no creation time), so the same
    images give the same bytes.

    Parameters
    ----------
    path : str or PathLike
        Output file (``.mrcs`` by convention).
    images : (n, box, box) array
        Converted to float32.
    pixel_size_angst : float
        Stored as the header voxel size, Å.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    assert images.ndim == 3, images.shape
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(images)
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size_angst)
            mrc.header.label[0] = label  # no creation time: same input, same bytes
            mrc.header.nlabl = 1
