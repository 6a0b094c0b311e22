"""Full passes on Dask distributed: particle shards on workers, sums reduced on the client.

DESIGN §3 "Scale-out": a full iteration is a map over particle shards that
returns sufficient statistics, then a reduce. :class:`DaskPass` is a
``pass_fn`` for :meth:`cryo2d.em.engine.Engine.iterate`: it cuts the pass's
particles into contiguous shards (in order, one per worker), sends each worker
what its E-step needs — the particle file's location (a
:class:`ParticleSource`; every worker reads its own images), the config, the
class transforms, the noise model, the class priors, the scales of its
particles and the search plan — and adds what comes back with
:meth:`Engine.reduce_pass` in shard order, the same reduction the
single-process pass uses. A worker keeps its :class:`Engine` (the opened
particle set, geometry, masks) between iterations.

Online iterations (small batches) stay on the client. A worker that dies
mid-pass is replaced (the nanny restarts it) and Dask reruns its shard
elsewhere; shards are pure functions of what they are sent, so the result does
not change.

Dask is imported only here, and this module only when ``--workers`` or
``--scheduler`` is used.
"""
from __future__ import annotations

import copy
import pickle
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cryo2d.em.config import EMConfig
from cryo2d.em.engine import Engine, IterationPlan, ShardSums
from cryo2d.em.geometry import PointSet
from cryo2d.errors import Cryo2DError
from cryo2d.particles import ParticleSet
from cryo2d.signals import interrupts_held

#: Engines a worker process keeps (one per run; older runs are dropped).
_CACHE_SIZE = 2
_ENGINES: OrderedDict[str, Engine] = OrderedDict()
_ENGINES_LOCK = threading.Lock()


@dataclass(frozen=True)
class ParticleSource:
    """Where a worker reads the particles from: a file path, never pixels.

    Attributes
    ----------
    path : str
        Absolute path of the STAR, .cs or .csg file (the same path must work
        on every worker: a shared file system).
    project_dir : str or None
        The project folder relative image paths start from (``--project-dir``).
    no_ctf : bool
        Read no CTF (``--no-ctf``).
    rows : (n,) int64 array or None
        The rows of the file that were classified (after ``--skip-bad``); None = all.
    invert_contrast : bool
        Read the images multiplied by -1 (the run inverted them: ``cryo2d.contrast``).
    stack_folders : tuple of str or None
        Absolute folders the client found the stack files in: the file's
        i-th distinct stack name (as it spells it) is read from
        ``stack_folders[stack_folder[i]] / name`` (-1: an absolute name, read
        as it is). A worker thus reads the client's files whatever its own
        current folder (relative names are looked up from the current
        folder, among others). None: looked up as the reader does.
    stack_folder : (n_stacks,) int32 array or None
        See ``stack_folders``.
    stack_names : tuple of str or None
        The client's distinct stack names, in the order of ``stack_folder``
        (given with it): a worker finds each of its names' folders by name (a
        file that grew since the client read it may name more stacks, in
        another order, and the worker opens only its rows' stacks).
    """

    path: str
    project_dir: str | None = None
    no_ctf: bool = False
    rows: np.ndarray | None = None
    invert_contrast: bool = False
    stack_folders: tuple[str, ...] | None = None
    stack_folder: np.ndarray | None = None
    stack_names: tuple[str, ...] | None = None

    def open(self) -> ParticleSet:
        """Read the particle set (metadata; images are read from the stacks on demand).

        Only ``rows`` are kept, and only the stacks they name are opened: a
        file that grew since the client read it (a stream's growing STAR or
        ``.cs`` file) may name more rows and stacks, still being written.
        """
        from cryo2d.classify import subset_particles
        from cryo2d.contrast import invert_contrast
        from cryo2d.io import StackRefs, open_stack, read_particles

        particles = read_particles(self.path, project_dir=self.project_dir, no_ctf=self.no_ctf, open_stacks=False)
        refs = particles.stack
        if not isinstance(refs, StackRefs):  # opened by its reader: nothing to map
            particles = open_stack(particles)
            if self.invert_contrast:
                particles = invert_contrast(particles)
            return particles if self.rows is None else subset_particles(particles, self.rows)
        if self.rows is not None:
            rows = np.asarray(self.rows, dtype=np.int64)
            if len(rows) and rows.max() >= len(refs):
                raise Cryo2DError(f"{self.path}: the worker reads {len(refs)} particles, the client classified "
                                  f"row {int(rows.max()) + 1} (is the file the same on every machine?)")
            used, file_index = np.unique(refs.file_index[rows], return_inverse=True)
            refs = replace(refs, names=[refs.names[i] for i in used], candidates=[refs.candidates[i] for i in used],
                           file_index=file_index.reshape(-1).astype(np.int64), image_index=refs.image_index[rows],
                           sign=None if refs.sign is None else refs.sign[rows])
            particles = subset_particles(particles, rows)
        if self.stack_folders is not None and self.stack_folder is not None:
            where = dict(zip(self.stack_names or (), self.stack_folder.tolist()))
            unknown = [name for name in refs.names if name not in where]
            if unknown:
                raise Cryo2DError(f"{self.path}: the worker reads stack {unknown[0]}, which the client did not "
                                  "(is the file the same on every machine?)")
            places = [[Path(name)] if where[name] < 0 else [Path(self.stack_folders[where[name]]) / name]
                      for name in refs.names]
            refs = replace(refs, candidates=places)
        particles = open_stack(replace(particles, stack=refs))
        if self.invert_contrast:
            particles = invert_contrast(particles)
        return particles


@dataclass(frozen=True)
class ConcatSource:
    """Particles read from several files (parts) and joined in order: a stream's particles so far.

    Attributes
    ----------
    parts : tuple of ParticleSource
        Each file and the rows of it that are classified, in the set's order.
    name : str
        What the joined set names as its source (the watched folder or file).
    """

    parts: tuple[ParticleSource, ...]
    name: str

    @property
    def path(self) -> str:
        return self.name

    def open(self) -> ParticleSet:
        """Read every part and join them (metadata; images are read from the stacks on demand)."""
        from cryo2d.io.concat import concat_particles

        return concat_particles([part.open() for part in self.parts], self.name)


def source_of(particles: ParticleSet, project_dir=None, rows: np.ndarray | None = None) -> ParticleSource:
    """The :class:`ParticleSource` of a set read from a STAR, .cs or .csg file.

    Relative names (a file given from the current folder, ``project_dir``,
    the stacks found) are resolved here, from the client's current folder:
    a worker started elsewhere reads the same files.

    Raises
    ------
    Cryo2DError
        When the set was not read from an existing STAR, .cs or .csg file (an
        in-memory set cannot be sent to workers without shipping its pixels).
    """
    path = Path(particles.source)
    if path.suffix.lower() not in (".star", ".cs", ".csg") or not path.is_file():
        raise Cryo2DError(f"{path}: --workers/--scheduler need particles read from a STAR, .cs or .csg file")
    folders, folder = stack_folders_of(particles)
    return ParticleSource(
        path=str(path.resolve()),
        project_dir=None if project_dir is None else str(Path(project_dir).resolve()),
        no_ctf=particles.ctf is None,
        rows=None if rows is None else np.asarray(rows, dtype=np.int64),
        invert_contrast=bool(particles.extra.get("contrast_inverted", False)),
        stack_folders=folders,
        stack_folder=folder,
        stack_names=None if folders is None else stack_names_of(particles),
    )


def stack_folders_of(particles: ParticleSet) -> tuple[tuple[str, ...] | None, np.ndarray | None]:
    """Where the client found each stack file: ``ParticleSource.stack_folders`` and ``stack_folder``.

    (None, None) when the stacks are not open MRC files or a file is not its
    name below a folder.
    """
    stack = _mrc_stack(particles)
    if stack is None:
        return None, None
    folders: dict[str, int] = {}
    folder = np.full(len(stack.names), -1, dtype=np.int32)
    for i, (name, found) in enumerate(zip(stack.names, stack.files)):
        relative = Path(name)
        if relative.is_absolute():
            continue
        found = Path.cwd() / found  # as it is when already absolute
        depth = len(relative.parts)
        if not 0 < depth <= len(found.parents) or found.parents[depth - 1] / relative != found:
            return None, None
        folder[i] = folders.setdefault(str(found.parents[depth - 1]), len(folders))
    return tuple(folders), folder


def stack_names_of(particles: ParticleSet) -> tuple[str, ...] | None:
    """The distinct stack names of the file, as it spells them (``ParticleSource.stack_names``)."""
    stack = _mrc_stack(particles)
    return None if stack is None else tuple(stack.names)


def _mrc_stack(particles: ParticleSet):
    """The opened MRC stacks of the file (below a subset's rows), or None."""
    from cryo2d.io import MRCStack

    stack = particles.stack
    while not isinstance(stack, MRCStack) and hasattr(stack, "stack"):  # a subset (--skip-bad) of the file's stack
        stack = stack.stack
    return stack if isinstance(stack, MRCStack) else None


# ---------------------------------------------------------------- wire formats
def _plan_to_wire(plan: IterationPlan) -> dict:
    p = plan.points
    return {
        "r_cur": plan.r_cur, "temperature": plan.temperature, "r_mstep": plan.r_mstep, "shift_step": plan.shift_step,
        "psi_rad": plan.psi_rad.cpu().numpy(), "shifts_px": plan.shifts_px.cpu().numpy(),
        "flat": p.flat.cpu().numpy(), "xy": p.xy.cpu().numpy(), "shell": p.shell.cpu().numpy(),
        "weight": p.weight.cpu().numpy(),
        "ctf2_shell": None if plan.ctf2_shell is None else plan.ctf2_shell.cpu().numpy(),
    }


def _plan_from_wire(w: dict, device) -> IterationPlan:
    t = lambda name: torch.from_numpy(w[name]).to(device)  # noqa: E731
    return IterationPlan(
        r_cur=w["r_cur"], psi_rad=t("psi_rad"), shifts_px=t("shifts_px"),
        points=PointSet(flat=t("flat"), xy=t("xy"), shell=t("shell"), weight=t("weight")),
        temperature=w["temperature"], r_mstep=w["r_mstep"], shift_step=w["shift_step"],
        ctf2_shell=None if w.get("ctf2_shell") is None else t("ctf2_shell"),
    )


@dataclass(frozen=True)
class RunSpec:
    """What a worker needs to build its Engine for a run.

    Attributes
    ----------
    run_key : str
        Names the run; a worker caches its Engine under it.
    source : ParticleSource
    config : EMConfig
    device : str
    n_particles : int
        Size of the client's particle set (checked against the worker's).
    """

    run_key: str
    source: ParticleSource
    config: EMConfig
    device: str
    n_particles: int


@dataclass
class ShardTask:
    """Everything one worker needs for one shard of one pass (numpy only).

    Attributes
    ----------
    run : RunSpec
    idx : (b,) int64
        The shard's particles (indices into the set), in pass order.
    scale : (b,) float32
        Their current scale factors.
    A : (K, m) complex64
        Class transforms at the M-step points.
    sigma2_shell : (n_shells,) float32
        Noise variance per shell.
    log_prior : (K,) float32
    null_class : int
        The empty-box class, -1 for none.
    plan : dict
        The iteration's search plan (:func:`_plan_to_wire`).
    mode : str
        "soft", "max_pose", "hard" or "hard_class" (see :meth:`Engine.iterate`).
    """

    run: RunSpec
    idx: np.ndarray
    scale: np.ndarray
    A: np.ndarray
    sigma2_shell: np.ndarray
    log_prior: np.ndarray
    null_class: int
    plan: dict
    mode: str


def _shard_to_wire(sh: ShardSums) -> dict:
    return {
        "num": sh.num.cpu().numpy(), "den": sh.den.cpu().numpy(), "counts": sh.counts.cpu().numpy(),
        "shell_resid": sh.shell_resid.cpu().numpy(), "shell_points": sh.shell_points.cpu().numpy(), "per": sh.per,
    }


def _shard_from_wire(w: dict) -> ShardSums:
    return ShardSums(
        num=torch.from_numpy(w["num"]), den=torch.from_numpy(w["den"]), counts=torch.from_numpy(w["counts"]),
        shell_resid=torch.from_numpy(w["shell_resid"]), shell_points=torch.from_numpy(w["shell_points"]), per=w["per"],
    )


def _nbytes(obj) -> int:
    """Bytes of ``obj`` as pickled (protocol 5, what Dask sends for it)."""
    return len(pickle.dumps(obj, protocol=5))


# ---------------------------------------------------------------- worker side
def _worker_engine(run: RunSpec) -> Engine:
    """The worker's Engine for this run (built on first use, then cached)."""
    with _ENGINES_LOCK:
        eng = _ENGINES.get(run.run_key)
        if eng is None:
            particles = run.source.open()
            if len(particles) != run.n_particles:
                raise Cryo2DError(
                    f"{run.source.path}: the worker reads {len(particles)} particles, the client has "
                    f"{run.n_particles} (is the file the same on every machine?)"
                )
            eng = Engine(particles, run.config, run.device)
            _ENGINES[run.run_key] = eng
            while len(_ENGINES) > _CACHE_SIZE:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(run.run_key)
    return eng


def warm_up(run: RunSpec) -> int:
    """Worker task: build and cache the run's Engine ahead of the first shard; returns the particle count."""
    return len(_worker_engine(run).particles)


def run_shard(task: ShardTask) -> dict:
    """Worker task: E-step and linear sums of one shard (:meth:`Engine.pass_shard`).

    Returns the :class:`ShardSums` as numpy arrays (keys num, den, counts,
    shell_resid, per). Runs on a private shallow copy of the cached engine's
    state, so concurrent shards on one worker do not interfere.
    """
    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, int(get_worker().state.nthreads)))
    except (ImportError, ValueError):  # called outside a worker (tests of this function)
        pass
    base = _worker_engine(task.run)
    dev = base.device
    scale = np.ones(task.run.n_particles, dtype=np.float32)
    scale[task.idx] = task.scale
    eng = copy.copy(base)
    eng.state = replace(
        base.state,
        A=torch.from_numpy(task.A).to(dev),
        sigma2_shell=torch.from_numpy(task.sigma2_shell).to(dev),
        log_prior=torch.from_numpy(task.log_prior).to(dev),
        scale=scale,
        null_class=task.null_class,
    )
    assert eng.state.A.shape == (eng.K, len(eng.mpts)), "worker geometry differs from the client's"
    return _shard_to_wire(eng.pass_shard(task.idx, _plan_from_wire(task.plan, dev), task.mode))


# ---------------------------------------------------------------- client side
def shard_bounds(n: int, n_shards: int) -> np.ndarray:
    """Contiguous, in-order shard boundaries: ``idx[b[i]:b[i+1]]`` is shard i, sizes differ by ≤ 1."""
    n_shards = max(1, min(n, n_shards))
    return np.array([(i * n) // n_shards for i in range(n_shards + 1)], dtype=np.int64)


class DaskPass:
    """A ``pass_fn`` (see :meth:`Engine.iterate`) that runs full passes on a Dask cluster.

    On creation each worker is sent a warm-up task (imports, opening the
    particle file, building its Engine), which overlaps the client's online
    iterations.

    Parameters
    ----------
    client : distributed.Client or None
        None only builds tasks (:meth:`tasks`), e.g. to measure their size.
    source : ParticleSource
        Where workers read the particles (the same set as ``engine.particles``).
    engine : Engine
        The client's engine: its state is what the workers' E-steps use and
        :meth:`Engine.reduce_pass` adds their sums.
    device : str, optional
        Where workers compute (default: the engine's device).
    shards_per_worker : int
        Shards per worker and pass (1: each worker pays the back-rotation of
        its sums once per pass; more balances uneven workers).
    worker_timeout_s : float
        How long a pass waits without any worker before giving up (Cryo2DError).

    Attributes
    ----------
    stats : list of dict
        Per distributed pass: iteration, workers, shard sizes, bytes sent
        (pickled tasks) and received (pickled results), wall time (s).
    """

    def __init__(self, client, source: ParticleSource, engine: Engine, *, device: str | None = None,
                 shards_per_worker: int = 1, worker_timeout_s: float = 300.0) -> None:
        self.client, self.source, self.engine = client, source, engine
        self.device = str(engine.device) if device is None else device
        self.shards_per_worker = int(shards_per_worker)
        self.worker_timeout_s = float(worker_timeout_s)
        self.spec = RunSpec(f"cryo2d-{uuid.uuid4().hex}", source, engine.config, self.device, len(engine.particles))
        self.address = None if client is None else getattr(client.scheduler, "address", None)
        self.stats: list[dict] = []
        self._n_submitted = 0
        self._iteration: int | None = None  # of the pass running (for messages)
        # Workers import, open the particle file and build their Engine while the client runs the online iterations.
        self._warm = [client.submit(warm_up, self.spec, key=f"cryo2d-warm-{self.spec.run_key[7:15]}-{i}", pure=False,
                                    workers=[w]) for i, w in enumerate(self._workers())] if client is not None else []

    def __call__(self, idx: np.ndarray, plan: IterationPlan, mode: str, iteration: int):
        """Online iterations on the client, full iterations on the workers."""
        if iteration < self.engine.config.n_online_iterations:
            return self.engine.pass_over(idx, plan, mode, iteration)
        return self.run(idx, plan, mode, iteration)

    def _connected(self, iteration: int | None = None) -> None:
        """Raise Cryo2DError once the client has lost its scheduler for good.

        A client whose scheduler stops cancels its futures and tries to
        reconnect for its connect timeout (status "connecting"), then
        closes: this waits out the reconnection, and raises unless it worked.
        """
        deadline = time.monotonic() + self.worker_timeout_s
        while self.client.status in ("connecting", "newly-created") and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.client.status != "running":
            iteration = self._iteration if iteration is None else iteration
            during = "" if iteration is None else f" during iteration {iteration + 1}"
            raise Cryo2DError(f"Dask scheduler {self.address}: connection lost{during} (did the scheduler stop?)")

    def _worker_names(self) -> list[str]:
        """The scheduler's workers now (Cryo2DError when the scheduler is gone)."""
        self._connected()
        info = self.client.scheduler_info(n_workers=-1)
        self._connected()
        return sorted(info.get("workers", {}))

    def _workers(self) -> list[str]:
        workers = self._worker_names()
        if not workers:
            try:
                self.client.wait_for_workers(1, timeout=self.worker_timeout_s)
            except TimeoutError:
                self._connected()
                raise Cryo2DError(
                    f"Dask scheduler {self.address}: no workers after {self.worker_timeout_s:g} s"
                ) from None
            except OSError:  # the scheduler went away meanwhile
                self._connected()  # raises unless the client reconnected
            workers = self._worker_names()
        return workers

    def tasks(self, idx: np.ndarray, plan: IterationPlan, mode: str, n_shards: int) -> list[ShardTask]:
        """The shard tasks of one pass over ``idx`` (contiguous, in order)."""
        s, idx = self.engine.state, np.asarray(idx, dtype=np.int64)
        common = dict(
            run=self.spec, A=s.A.cpu().numpy(),
            sigma2_shell=s.sigma2_shell.float().cpu().numpy(), log_prior=s.log_prior.float().cpu().numpy(),
            null_class=int(s.null_class), plan=_plan_to_wire(plan), mode=mode,
        )
        b = shard_bounds(len(idx), n_shards)
        return [ShardTask(idx=idx[b[i]:b[i + 1]], scale=s.scale[idx[b[i]:b[i + 1]]], **common) for i in range(len(b) - 1)]

    def run(self, idx: np.ndarray, plan: IterationPlan, mode: str, iteration: int):
        """One pass over ``idx`` on the workers; returns what :meth:`Engine.pass_over` returns."""
        t0 = time.perf_counter()
        self._iteration = iteration
        self._warm = []  # done or queued ahead of the shards; their results are not needed
        workers = self._workers()
        tasks = self.tasks(idx, plan, mode, self.shards_per_worker * len(workers))
        results = self._gather(tasks, iteration)
        shards = [_shard_from_wire(r) for r in results]  # shard order, whoever finished first
        self.stats.append({
            "iteration": iteration,
            "workers": len(workers),
            "shard_sizes": [len(t.idx) for t in tasks],
            "bytes_sent": sum(_nbytes(t) for t in tasks),
            "bytes_received": sum(_nbytes(r) for r in results),
            "time_s": time.perf_counter() - t0,
        })
        return self.engine.reduce_pass(shards)

    def _gather(self, tasks: list[ShardTask], iteration: int) -> list[dict]:
        """The shards' results, in shard order.

        Dask reruns a shard whose worker died; one that outlived
        ``distributed.scheduler.allowed-failures`` workers (KilledWorker) is
        submitted afresh, up to twice per shard. A task's own error is
        raised. Without any worker for ``worker_timeout_s``: Cryo2DError.
        """
        from distributed import KilledWorker

        futures = [self._submit(t, i, iteration) for i, t in enumerate(tasks)]
        retries, alone_since = 0, None
        while True:
            self._connected(iteration)
            pending = [f for f in futures if f.status == "pending"]
            if pending:
                try:  # wake up when the first pending shard ends, or after 2 s
                    pending[0].result(timeout=2.0)
                except Exception:  # noqa: BLE001 - handled from its status just below
                    pass
            for i, f in enumerate(futures):
                if f.status in ("error", "cancelled"):
                    self._connected(iteration)  # cancelled because the client closed: not a worker lost
                    lost = f.status == "cancelled" or isinstance(f.exception(), KilledWorker)
                    if not lost or retries >= 2 * len(tasks):
                        f.result()  # raises the task's error (or KilledWorker)
                    retries += 1
                    self._workers()  # waits for one (Cryo2DError after worker_timeout_s)
                    futures[i] = self._submit(tasks[i], i, iteration)
            if all(f.status == "finished" for f in futures):
                return self.client.gather(futures)
            if self._worker_names():
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > self.worker_timeout_s:
                raise Cryo2DError(f"Dask scheduler {self.address}: no workers left for "
                                  f"{self.worker_timeout_s:g} s during iteration {iteration + 1}")

    def _submit(self, task: ShardTask, i: int, iteration: int):
        # No worker restrictions: every worker has the Engine (warm-up), and a
        # shard restricted to a worker that died can stay 'no-worker' for good
        # (seen with allow_other_workers=True on distributed 2026.8).
        self._n_submitted += 1
        key = f"cryo2d-shard-{self.spec.run_key[7:15]}-it{iteration}-{i}-{self._n_submitted}"
        return self.client.submit(run_shard, task, key=key, pure=False)


@contextmanager
def dask_client(*, workers: int | None = None, scheduler: str | None = None, timeout_s: float = 10.0) -> Iterator:
    """A ``distributed.Client``: a local cluster of ``workers`` processes, or an existing scheduler.

    Parameters
    ----------
    workers : int, optional
        Start a local cluster of this many single-threaded worker processes
        (each with a nanny that restarts it if it dies).
    scheduler : str, optional
        Address of a running scheduler (``tcp://HOST:PORT``), e.g. one that
        dask-jobqueue started on SLURM.
    timeout_s : float
        How long to try to reach the scheduler.

    Raises
    ------
    Cryo2DError
        Both or neither given, ``workers`` < 1, Dask not installed, the
        scheduler address is not a ``tcp://`` one, or the scheduler cannot
        be reached.

    Notes
    -----
    The local cluster's processes log only CRITICAL messages: a task's error
    (e.g. a stack file cut short) reaches the caller as the task's
    exception, without the workers' "Compute Failed" traceback blocks.
    """
    if (workers is None) == (scheduler is None):
        raise Cryo2DError("give one of --workers N (local cluster) or --scheduler ADDRESS (existing cluster)")
    if workers is not None and workers < 1:
        raise Cryo2DError(f"--workers must be at least 1 (got {workers})")
    try:
        import logging

        from distributed import Client, LocalCluster
    except ImportError:
        raise Cryo2DError("--workers/--scheduler need Dask: pip install 'cryo2d[dask]'") from None
    if scheduler is not None:
        # A malformed address is refused before a Client exists: one left half
        # made hung for 20 s at exit and printed a traceback from its __del__.
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            scheme, location = parse_address(scheduler)
            if scheme != "inproc":
                parse_host_port(location)
        except ValueError as err:
            raise Cryo2DError(f"--scheduler {scheduler}: not a scheduler address ({err}); give one such as "
                              "tcp://node1:8786") from None
        # Other protocols need what a Client is not given here (tls: certificates; ucx: ucx-py; inproc: a
        # scheduler in this process): the Client failed half made, with the hang and traceback above.
        if scheme != "tcp":
            raise Cryo2DError(f"--scheduler {scheduler}: {scheme}:// is not supported (only tcp:// addresses, "
                              "such as tcp://node1:8786)")
        try:
            client = Client(scheduler, timeout=f"{timeout_s}s", set_as_default=False)
        except (OSError, ValueError, TypeError) as err:
            msg = " ".join(str(err).split()) or type(err).__name__
            raise Cryo2DError(f"--scheduler {scheduler}: cannot connect ({msg})") from None
        # A scheduler that stops makes the client log "Failed to reconnect ..." before DaskPass
        # says so in its one line (Cryo2DError).
        client_log = logging.getLogger("distributed.client")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)
        try:
            yield client
        finally:
            client.close()
            client_log.setLevel(level)
        return
    # Ctrl-C while the nannies start their workers left Dask's "Nanny failed to start" tracebacks
    # after "cryo2d: interrupted": it is held until the cluster is up, then closes it.
    with interrupts_held() as caught:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.CRITICAL)
        # A nanny restarts its worker when it dies; should a nanny give up (its worker
        # killed while starting), adaptive scaling starts a new one.
        cluster.adapt(minimum=workers, maximum=workers)
        client = Client(cluster, set_as_default=False)
    if caught:
        client.close()
        cluster.close()
        raise KeyboardInterrupt
    try:
        yield client
    finally:
        client.close()
        cluster.close()
