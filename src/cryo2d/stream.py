"""Streaming 2D classification: classify particles while they are still being collected.

The schedule is CryoSPARC's Streaming 2D Classification (v4.4+):

1. Wait until ``batch_size_per_class × n_classes × n_online_iterations``
   particles have arrived (at least ``n_classes``), then run the batch job's
   whole schedule on them: initialisation, the online-EM iterations (each on
   a fresh batch of ``batch_size_per_class × n_classes``, as in ``classify``)
   and the final full passes. With the same seed and all the particles there
   at the start, this first update equals ``classify`` on them.
2. After that, each time at least ``batch_size_per_class × n_classes × 2``
   new particles have arrived, run one full iteration over every particle so
   far, starting from the classes, noise model and random state of the last
   update (the last pass of an update is ``hard_last`` as in ``classify``).

Every update writes the job folder as ``classify`` does (classes.mrcs,
classes.star, particles.star or .cs, gallery.png, iterations.jsonl), then
``stream_checkpoint.pt`` and a line in ``updates.jsonl``, and ``stream.json``
last. ``stream.json`` holds the update counter; it says ``"status":
"writing"`` while an update's files are being replaced and ``"complete"``
once they all belong to that update, so a watcher that reads ``complete``
before and after reading the outputs, with the same ``update``, has a
consistent set. Restarting on the same job folder resumes from the
checkpoint: particles are identified by file and row, so none is read twice
or left out.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryo2d._callable import make_callable
from cryo2d.classify import JOB_FILES, ClassifyResult, finalize, origins_note, subset_particles, write_job
from cryo2d.contrast import invert_contrast, settle_contrast
from cryo2d.em.config import EMConfig, check_device
from cryo2d.em.engine import Engine, check_settings, final_result
from cryo2d.em.start import start_classes
from cryo2d.em.state import RunState
from cryo2d.errors import Cryo2DError
from cryo2d.io import (
    atomic_path, check_finite, make_output_folder, nonfinite_indices, write_json_atomic, write_text_atomic,
)
from cryo2d.io.concat import concat_particles
from cryo2d.io.outputs import refuse_overwriting_inputs
from cryo2d.io.watch import ParticleWatcher, row_keys, rows_digest
from cryo2d.particles import ParticleSet
from cryo2d.signals import interrupts_held

CHECKPOINT = "stream_checkpoint.pt"
_VERSION = 1


def start_threshold(config: EMConfig) -> int:
    """Particles needed before the first update: batch × classes × online iterations (≥ classes)."""
    return max(config.n_classes, config.batch_size_per_class * config.n_classes * config.n_online_iterations)


def update_threshold(config: EMConfig) -> int:
    """New particles that trigger a later update: batch × classes × 2."""
    return config.batch_size_per_class * config.n_classes * 2


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one input file, classified from one update on.

    Attributes
    ----------
    file : str
        File name relative to the watched folder.
    start, stop : int
        0-based row range in that file.
    skipped : tuple of int
        Rows in the range dropped for NaN/Inf pixels (``skip_bad``).
    digest : str
        SHA-1 of the rows' image references (a rewritten file is refused).
    update : int
        The update that first classified these rows.
    """

    file: str
    start: int
    stop: int
    skipped: tuple[int, ...] = ()
    digest: str = ""
    update: int = 0

    def rows(self) -> np.ndarray:
        """0-based rows of the file that are classified, (m,) int64."""
        rows = np.arange(self.start, self.stop, dtype=np.int64)
        return np.setdiff1d(rows, np.asarray(self.skipped, dtype=np.int64)) if self.skipped else rows


@dataclass
class StreamResult:
    """How a stream run ended.

    Attributes
    ----------
    updates : int
        The job's update counter (across restarts).
    n_particles : int
        Particles classified in the last update.
    n_pending : int
        Particles complete on disk but not yet classified when it stopped.
    stopped : str
        ``"until"``, ``"idle"``, ``"stop"`` (stop event) or ``"interrupted"`` (Ctrl-C).
    pieces : list of Piece
        What was classified, file by file.
    n_skipped : int
        Images dropped for NaN/Inf pixels (``skip_bad``).
    last : ClassifyResult or None
        The last update's result, when this run made one.
    """

    updates: int
    n_particles: int
    n_pending: int
    stopped: str
    pieces: list[Piece] = field(default_factory=list)
    n_skipped: int = 0
    last: ClassifyResult | None = None


def carry_state(engine: Engine, state: RunState, rng_state: dict) -> None:
    """Continue ``engine`` (over n particles) from the state of a run over the first n_old ≤ n of them.

    Class quantities (tensors), the noise model, the iteration history and
    the random generator are taken over; per-particle arrays keep the old
    values for the first n_old particles and ``new_state``'s "not yet seen"
    defaults (class -1, scale 1) for the new ones.
    """
    dst = engine.state
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            setattr(dst, name, value.detach().clone().to(engine.device))
        elif isinstance(value, np.ndarray):
            target = getattr(dst, name)
            assert len(value) <= len(target), name
            target[: len(value)] = value
        elif isinstance(value, list):
            setattr(dst, name, list(value))
        else:
            setattr(dst, name, value)
    engine.rng.bit_generator.state = rng_state


class _Stream:
    """The job folder's stream: what was classified, the last state, and how to add to it."""

    def __init__(self, source: Path, out: Path, config: EMConfig, *, device: str, settle_s: float,
                 project_dir, skip_bad: bool, resume: bool) -> None:
        self.source, self.out, self.config, self.device = source, out, config, device
        self.skip_bad = skip_bad
        self.watcher = ParticleWatcher(source, settle_s=settle_s, project_dir=project_dir, no_ctf=not config.use_ctf)
        self.pieces: list[Piece] = []
        self.update = 0
        self.state: RunState | None = None
        self.rng_state: dict | None = None
        self.inverted: bool | None = None  # the images read times -1 (decided at the first update)
        self._verified: dict[tuple[str, int], tuple] = {}
        self._images: set[str] | None = None
        self.client = None  # a distributed.Client: full passes on Dask workers
        make_output_folder(out)
        if resume and (out / CHECKPOINT).exists():
            self._load(out / CHECKPOINT)

    # ------------------------------------------------------------ checkpoint
    def _source_id(self) -> str:
        return str(self.source.resolve())

    def _save(self) -> None:
        payload = {
            "version": _VERSION,
            "source": self._source_id(),
            "config": self.config.to_dict(),
            "update": self.update,
            "pieces": [asdict(p) for p in self.pieces],
            "rng": self.rng_state,
            "contrast_inverted": self.inverted,
            "state": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(self.state).items()},
        }
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save(payload, tmp)

    def _load(self, path: Path) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a damaged checkpoint is a user-visible problem
            raise Cryo2DError(f"{path}: cannot read stream checkpoint ({type(err).__name__})") from None
        if payload.get("version") != _VERSION:
            raise Cryo2DError(f"{path}: stream checkpoint of another version; use --no-resume to start again")
        if payload["source"] != self._source_id():
            raise Cryo2DError(f"{path}: this job streams {payload['source']}, not {self._source_id()}; "
                              "choose another -o or use --no-resume")
        ours, theirs = self.config.to_dict(), payload["config"]
        diff = [k for k in ours if ours[k] != theirs.get(k)]
        if diff:
            raise Cryo2DError(f"{path}: stream was started with other settings ({', '.join(diff)}); "
                              "use the same ones, or --no-resume to start again")
        self.update = int(payload["update"])
        self.pieces = [Piece(**{**p, "skipped": tuple(p["skipped"])}) for p in payload["pieces"]]
        self.state = RunState(**payload["state"])
        self.rng_state = payload["rng"]
        self.inverted = payload.get("contrast_inverted")

    # ------------------------------------------------------------ bookkeeping
    @property
    def n_particles(self) -> int:
        return sum(len(p.rows()) for p in self.pieces)

    def consumed(self) -> dict[str, int]:
        """Per file, the end of the rows already classified."""
        done: dict[str, int] = {}
        for p in self.pieces:
            done[p.file] = max(done.get(p.file, 0), p.stop)
        return done

    def pending(self) -> list[tuple[str, int, int]]:
        """(file, start, stop) of the complete rows not yet classified, in file-name order."""
        done = self.consumed()
        for piece in self.pieces:
            if piece.file in self.watcher.sets:
                self._checked(piece)
        for name in sorted(done.keys() & self.watcher.empty_signature.keys()):  # read again after a restart: empty
            raise Cryo2DError(f"{self.watcher.path(name)}: has 0 particles, but {done[name]} were "
                              "already classified from it (inputs must only grow)")
        out = []
        for name in sorted(self.watcher.sets):
            n, start = len(self.watcher.sets[name]), done.get(name, 0)
            if n < start:
                raise Cryo2DError(f"{self.watcher.path(name)}: has {n} particles, but {start} were "
                                  "already classified from it (inputs must only grow)")
            if n > start:
                out.append((name, start, n))
        return out

    def ready(self) -> bool:
        """Every file classified before is read again (after a restart) or still there."""
        for name in self.consumed():
            if name not in self.watcher.sets:
                if not self.watcher.path(name).exists():
                    raise Cryo2DError(f"{self.watcher.path(name)}: classified before but now missing")
                return False
        return True

    def _checked(self, piece: Piece) -> ParticleSet:
        """The piece's file, verified to still hold the same rows."""
        particles = self.watcher.sets[piece.file]
        key = (piece.file, piece.start)
        sig = self.watcher.read_signature[piece.file]
        if self._verified.get(key) != sig:
            if len(particles) < piece.stop or rows_digest(particles, piece.start, piece.stop) != piece.digest:
                raise Cryo2DError(f"{self.watcher.path(piece.file)}: rows {piece.start + 1}-{piece.stop} changed "
                                  "after they were classified (inputs must only grow)")
            self._verified[key] = sig
        return particles

    def _check_new_images(self, new: list[Piece]) -> None:
        """Refuse an image read twice (the same stack image named by two files or rows)."""
        def keys(piece: Piece) -> list[str]:
            particles = self.watcher.sets[piece.file]
            stack = particles.stack
            files = [str(Path(f).resolve()) for f in stack.files]
            rows = piece.rows()
            return [f"{files[f]}#{i}" for f, i in zip(stack.file_index[rows], stack.image_index[rows])]

        if self._images is None:
            self._images = {k for p in self.pieces for k in keys(p)}
        for piece in new:
            for key, ref in zip(keys(piece), row_keys(self.watcher.sets[piece.file], piece.rows())):
                if key in self._images:
                    raise Cryo2DError(f"{self.watcher.path(piece.file)}: image {ref} is already classified "
                                      "(named by an earlier file or row)")
                self._images.add(key)

    def combined(self, pieces: list[Piece]) -> ParticleSet:
        """All classified particles, in piece order, as one set."""
        parts = []
        for piece in pieces:
            particles = self._checked(piece)
            rows = piece.rows()
            whole = len(rows) == len(particles)
            parts.append(particles if whole else subset_particles(particles, rows))
        return concat_particles(parts, self.source)

    # ------------------------------------------------------------ one update
    def new_pieces(self, pending: list[tuple[str, int, int]]) -> list[Piece]:
        pieces = []
        for name, start, stop in pending:
            particles = self.watcher.sets[name]
            rows = np.arange(start, stop)
            skipped: tuple[int, ...] = ()
            if self.skip_bad:
                bad = nonfinite_indices(subset_particles(particles, rows).stack)
                skipped = tuple(int(start + b) for b in bad)
            else:
                check_finite(subset_particles(particles, rows).stack)
            pieces.append(Piece(name, start, stop, skipped, rows_digest(particles, start, stop), self.update + 1))
        return pieces

    def run_update(self, pending: list[tuple[str, int, int]], on_iteration: Callable[[dict], None] | None,
                   on_note: Callable[[str], None] | None = None) -> tuple[dict, ClassifyResult, bool]:
        """Classify the pending rows with the earlier ones; write the job. Returns (summary, result, interrupted).

        The first update settles the images' contrast for the stream (``config.invert_contrast``,
        :func:`cryo2d.contrast.settle_contrast`; its note goes to ``on_note``); later ones keep it.
        An update whose new particles have input origins says so too (:func:`cryo2d.classify.origins_note`).
        """
        t0 = time.perf_counter()
        new = self.new_pieces(pending)
        self._check_new_images(new)
        pieces = self.pieces + new
        particles = self.combined(pieces)
        # The first update decides (the option, or the measure) and says so; later ones repeat that decision.
        if self.inverted is None:
            particles, note = settle_contrast(particles, self.config.invert_contrast)
            if note is not None and on_note is not None:
                on_note(f"{self.source}: {note}")
        elif self.inverted:
            particles = invert_contrast(particles)
        fresh = None if particles.prior_shift_px is None else particles.prior_shift_px[self.n_particles:]
        if self.config.input_shifts and fresh is not None and fresh.any() and on_note is not None:
            on_note(f"{self.source}: the new particles: {origins_note(fresh)}")
        self.inverted = bool(particles.extra.get("contrast_inverted", False))
        engine = Engine(particles, self.config, self.device)
        cfg = self.config
        pass_fn = self._dask_pass(pieces, engine) if self.client is not None else None
        if self.state is None:
            start_classes(engine, None if on_note is None else (lambda line: on_note(f"{self.source}: {line}")))
            iterations = range(cfg.n_online_iterations + max(cfg.n_full_iterations, 1))
            for it in iterations:
                record = engine.iterate(it, pass_fn=pass_fn)
                if on_iteration is not None:
                    on_iteration(record)
        else:
            carry_state(engine, self.state, self.rng_state)
            record = engine.iterate(len(engine.state.history), last=True, pass_fn=pass_fn)
            if on_iteration is not None:
                on_iteration(record)
        result = final_result(engine, on_iteration)
        final = finalize(result, particles, cfg)
        n_old = self.n_particles
        self.pieces, self.state, self.rng_state = pieces, engine.state, engine.rng.bit_generator.state
        self.update += 1
        final.out_dir = self.out
        final.n_bad = sum(len(p.skipped) for p in pieces)
        summary = {
            "update": self.update,
            "particles": len(particles),
            "new_particles": len(particles) - n_old,
            "files": len({p.file for p in pieces}),
            "iterations": len(engine.state.history),
            "nonempty_classes": int((final.counts > 0).sum()),
            "best_resolution_angst": round(float(np.min(final.resolution_angst)), 2),
            "skipped_bad": final.n_bad,
            "duplicates": final.n_duplicates,
            "time_s": round(time.perf_counter() - t0, 3),
        }
        with interrupts_held() as caught:
            self._write(final, particles, summary, result.geometry.pixel_size_angst)
        return summary, final, bool(caught)

    def _dask_pass(self, pieces: list[Piece], engine: Engine):
        """A pass_fn that runs this update's full passes on the Dask workers (online batches stay here).

        Workers read the same files and rows as :meth:`combined` joins, in the same order.
        """
        from cryo2d.em.distributed import ConcatSource, DaskPass, ParticleSource, stack_folders_of, stack_names_of

        project = self.watcher.project_dir
        parts = []
        for p in pieces:
            read = self.watcher.sets[p.file]
            folders, folder = stack_folders_of(read)  # the stacks this process found
            # A worker reads the file as it is then: a growing one may name more rows and stacks, which it leaves out.
            parts.append(ParticleSource(path=str(self.watcher.path(p.file).resolve()),
                                        project_dir=None if project is None else str(Path(project).resolve()),
                                        no_ctf=not self.config.use_ctf, rows=p.rows(),
                                        invert_contrast=bool(self.inverted), stack_folders=folders, stack_folder=folder,
                                        stack_names=None if folders is None else stack_names_of(read)))
        parts = tuple(parts)
        return DaskPass(self.client, ConcatSource(parts, str(self.source)), engine)

    def _write(self, final: ClassifyResult, particles: ParticleSet, summary: dict, pixel_size_angst: float) -> None:
        """Outputs, checkpoint, update log, then stream.json "complete" (each write atomic)."""
        out = self.out
        write_json_atomic(out / "stream.json", {**summary, "status": "writing"})
        write_job(final, particles, out, pixel_size_angst)
        write_text_atomic(out / "iterations.jsonl", "".join(json.dumps(r) + "\n" for r in final.history))
        self._save()
        log = out / "updates.jsonl"
        previous = log.read_text(encoding="utf-8").splitlines(keepends=True) if log.exists() else []
        previous = [line for line in previous if json.loads(line)["update"] < self.update]
        write_text_atomic(log, "".join(previous) + json.dumps(summary) + "\n")
        write_json_atomic(out / "stream.json", {**summary, "status": "complete", "written_at": time.time()})


def stream(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EMConfig,
    *,
    device: str = "cpu",
    project_dir: str | os.PathLike | None = None,
    settle_s: float = 5.0,
    poll_s: float = 2.0,
    until: int | None = None,
    idle_stop_s: float | None = None,
    resume: bool = True,
    skip_bad: bool = False,
    on_update: Callable[[dict], None] | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> StreamResult:
    """Classify particles as they arrive in ``source``; write ``out_dir`` after each update.

    Parameters
    ----------
    source : path
        A folder that receives particle files (``*.star`` / ``*.cs``, with
        their MRC stacks), or one STAR / ``.cs`` file that grows.
    out_dir : path
        Job folder (see the module docstring for what is written).
    config : EMConfig
        Classification parameters, as for ``classify``; they also set the
        start and update thresholds (:func:`start_threshold`,
        :func:`update_threshold`).
    device : str
        "cpu" or "cuda".
    project_dir : path, optional
        CryoSPARC project folder for ``.cs`` blob paths.
    settle_s : float
        Seconds a file and its stacks must stay unchanged before they are read.
    poll_s : float
        Seconds between looks at the source.
    until : int, optional
        Stop once the job's update counter (counted across restarts) reaches this.
    idle_stop_s : float, optional
        Stop when nothing new has arrived for this many seconds; particles
        that arrived but did not reach the update threshold get a last update
        first (the first update needs at least ``n_classes`` particles). A
        file seen but not yet settled counts as arriving, so files already
        there are read first, even with 0 or less than ``settle_s``.
    resume : bool
        Continue the job's stream checkpoint when there is one (the default);
        False starts over.
    skip_bad : bool
        Drop (and count) images with NaN/Inf pixels instead of refusing them.
    on_update, on_iteration, on_note : callable, optional
        Called with each update's summary (dict), each EM iteration's log
        record (dict), and each one-line remark (str, e.g. a stack waited for).
    stop : threading.Event, optional
        Stops the stream (between updates) when set.
    workers, scheduler : optional
        Run the full passes on a local Dask cluster of ``workers`` processes,
        or on the workers of a running scheduler (``tcp://HOST:PORT``); see
        ``cryo2d.em.distributed``.

    Returns
    -------
    StreamResult
        Also on Ctrl-C (``stopped="interrupted"``): an update in progress is
        abandoned, the files of the last finished update stay, and a restart
        continues from there.
    """
    config.validate()
    check_device(device)
    if Path(source).is_dir() and Path(source).resolve() == Path(out_dir).resolve():
        raise Cryo2DError(f"{out_dir}: the job folder is the folder it watches; its own particles.star would be "
                          "read as new particles: choose another output folder")
    refuse_overwriting_inputs(out_dir, (*JOB_FILES, "stream.json", "updates.jsonl", CHECKPOINT), [source])
    run = _Stream(Path(source), Path(out_dir), config, device=device, settle_s=settle_s,
                  project_dir=project_dir, skip_bad=skip_bad, resume=resume)
    with ExitStack() as stack:
        if workers is not None or scheduler is not None:
            from cryo2d.em.distributed import dask_client

            run.client = stack.enter_context(dask_client(workers=workers, scheduler=scheduler))
        return _watch(run, source, config, poll_s=poll_s, until=until, idle_stop_s=idle_stop_s,
                      on_update=on_update, on_iteration=on_iteration, on_note=on_note, stop=stop)


def _watch(run: "_Stream", source, config: EMConfig, *, poll_s: float, until: int | None, idle_stop_s: float | None,
           on_update, on_iteration, on_note, stop: threading.Event | None) -> StreamResult:
    """The stream's loop: poll the source, run updates, until a stop condition."""
    if on_note is not None:
        resumed = f", continuing after update {run.update}" if run.update else ""
        on_note(f"watching {source}{resumed}: first update at {start_threshold(config)} particles, "
                f"then one every {update_threshold(config)} new ones")
    last, stopped, n_pending = None, "", 0
    last_change, last_pending = time.monotonic(), -1
    checked = run.state is not None  # the settings against the first particles' box and pixel size
    try:
        while True:
            if until is not None and run.update >= until:
                stopped = "until"
                break
            if stop is not None and stop.is_set():
                stopped = "stop"
                break
            notes, changed = run.watcher.poll()
            for note in notes:
                if on_note is not None:
                    on_note(note)
            pending = run.pending()
            if not checked and pending:
                check_settings(run.watcher.sets[pending[0][0]], config)
                checked = True
            n_pending = sum(b - a for _, a, b in pending)
            now = time.monotonic()
            # A file or stack new, changed or still settling, or rows newly read, is activity: a look
            # with any is never idle (not even at idle_stop_s 0), so files seen are read before stopping.
            active = changed or n_pending != last_pending
            if active:
                last_change, last_pending = now, n_pending
            idle = idle_stop_s is not None and not active and now - last_change >= idle_stop_s
            need = start_threshold(config) if run.state is None else update_threshold(config)
            enough = n_pending >= need or (idle and n_pending > 0)
            if run.state is None and run.n_particles + n_pending < config.n_classes:
                enough = False
            if enough and run.ready():
                summary, last, interrupted = run.run_update(pending, on_iteration, on_note)
                if on_update is not None:
                    on_update(summary)
                if interrupted:
                    raise KeyboardInterrupt
                # After an idle flush, stop at the next look unless something new came.
                n_pending, last_pending = 0, 0 if idle else -1
                last_change = last_change if idle else time.monotonic()
                continue
            if idle:
                stopped = "idle"
                break
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        stopped = "interrupted"
        n_pending = sum(b - a for _, a, b in run.pending())
    return StreamResult(
        updates=run.update, n_particles=run.n_particles, n_pending=n_pending, stopped=stopped,
        pieces=list(run.pieces), n_skipped=sum(len(p.skipped) for p in run.pieces), last=last,
    )


make_callable(__name__)  # cryo2d.stream(...) calls stream above (cryo2d._callable)
