"""Atomic file writes: a temporary file in the same folder, renamed on success.

An interrupted run never leaves a half-written output that looks complete:
the final name appears only once the whole file has been written and
flushed to disk (``os.replace`` is atomic within one file system).
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryo2d.errors import Cryo2DError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    Parameters
    ----------
    path : str or PathLike
        The final file name. Its folder must exist.

    Yields
    ------
    Path
        A fresh temporary file name in the same folder (``.NAME.XXXX.tmp``).
        Write the whole file there; when the ``with`` block ends without an
        exception the file is flushed to disk and renamed onto ``path``. On an
        exception the temporary file is removed and ``path`` is left as it was.

    Raises
    ------
    Cryo2DError
        When the file cannot be written (an ``OSError``: disk full, no
        permission; or the folder removed during the run).
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except OSError as err:  # a full disk, no permission, the folder removed: a one-line error
        raise Cryo2DError(f"{final}: cannot write ({err.strerror or err})") from None
    except RuntimeError:  # torch.save reports a missing folder so
        if not final.parent.is_dir():
            raise Cryo2DError(f"{final}: cannot write (folder {final.parent} no longer exists)") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def make_output_folder(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) if needed; Cryo2DError if it cannot be made.

    A file of that name, no permission or a full disk give one line naming the
    folder, not a traceback.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise Cryo2DError(f"{out}: exists and is not a folder") from None
    except OSError as err:
        raise Cryo2DError(f"{out}: cannot create output folder ({err.strerror or err})") from None
    return out


def refuse_overwriting_inputs(out_dir: str | os.PathLike, names: Iterable[str], inputs: Iterable[str | os.PathLike]) -> None:
    """Cryo2DError when a file called one of ``names`` in ``out_dir`` is one of ``inputs``.

    A job written into the folder of its own particle file would replace it
    (a job's particles.star over the input's particles.star).
    """
    out = Path(out_dir).resolve()
    targets = {out / name for name in names}
    for path in inputs:
        if Path(path).resolve() in targets:
            raise Cryo2DError(f"{out_dir}: the job would write {Path(path).name} over its input {path}; "
                              "choose another output folder")


#: Files that only a classification job writes (``cryo2d.classify.JOB_FILES`` less what select and
#: rebalance write, and ``cryo2d stream``'s own): a folder holding one is a job's, whose results an
#: output of select, rebalance or simulate must not replace (:func:`refuse_job_folder`).
JOB_MARKERS = ("checkpoint.pt", "stream_checkpoint.pt", "stream.json", "updates.jsonl", "iterations.jsonl",
               "classes.mrcs", "classes_unmasked.mrcs", "class_averages.cs", "class_averages.csg",
               "duplicates.star", "duplicates.cs", "duplicates.csg", "gallery.png")


def refuse_job_folder(out_dir: str | os.PathLike) -> None:
    """Cryo2DError when ``out_dir`` holds a classification job (a file of ``JOB_MARKERS``)."""
    out = Path(out_dir)
    marker = next((name for name in JOB_MARKERS if (out / name).exists()), None)
    if marker is not None:
        raise Cryo2DError(f"{out}: holds a classification job ({marker}); choose another folder")


def remove_stale(out_dir: str | os.PathLike, names: Iterable[str], written: Iterable[str]) -> None:
    """Remove the files called one of ``names`` in ``out_dir`` that are not in ``written``: an earlier
    run's outputs that this run does not replace, which would be read in place of its own."""
    out, keep = Path(out_dir), set(written)
    for name in names:
        if name not in keep:
            try:
                (out / name).unlink(missing_ok=True)
            except OSError as err:
                raise Cryo2DError(f"{out / name}: cannot remove an earlier run's file ({err.strerror or err})") from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
