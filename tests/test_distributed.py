"""Full iterations on Dask distributed (issue 7): the same numbers as one process, with 1-3 workers and after a kill."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin  # noqa: E402

from cryo2d.em.config import EMConfig  # noqa: E402
from cryo2d.em.distributed import DaskPass, dask_client, shard_bounds, source_of  # noqa: E402
from cryo2d.em.engine import Engine, run_em  # noqa: E402
from cryo2d.errors import Cryo2DError  # noqa: E402

# Two online iterations on the client, then two full passes on the workers.
CONFIG = EMConfig(n_classes=3, n_online_iterations=2, batch_size_per_class=20, n_full_iterations=2, seed=0)
#: float32 sums added in another order: class pixels agree to this fraction of the largest.
CLASS_RTOL = 1e-5
#: and posteriors (probabilities) to this absolute difference.
POST_ATOL = 5e-4


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    """300 particles, 32 px, SNR 1, three views, read from the STAR file workers re-open."""
    from cryo2d.io import read_particles
    from cryo2d.simulate import bundled_map_path, read_map, simulate, write_simulation

    sim = simulate(*read_map(bundled_map_path()), n_particles=300, box=32, snr=1.0, junk_fraction=0.0,
                   views="discrete", n_views=3, rare_view_fraction=0.0, seed=3)
    folder = write_simulation(sim, tmp_path_factory.mktemp("dist"))
    return read_particles(folder / "particles.star")


@pytest.fixture(scope="module")
def reference(particles):
    """The single-process result."""
    return run_em(particles, CONFIG)


def _local_cluster(n_workers: int) -> LocalCluster:
    import logging

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                        silence_logs=logging.CRITICAL)


def _run_distributed(particles, client: Client):
    passes: list[DaskPass] = []

    def make_pass(engine):
        passes.append(DaskPass(client, source_of(particles), engine))
        return passes[-1]

    return run_em(particles, CONFIG, make_pass=make_pass), passes[0]


def assert_same_result(result, ref) -> None:
    scale = float(np.abs(ref.classes).max())
    np.testing.assert_allclose(result.classes, ref.classes, rtol=0, atol=CLASS_RTOL * scale)
    np.testing.assert_array_equal(result.class_index, ref.class_index)
    np.testing.assert_array_equal(result.psi_deg, ref.psi_deg)  # poses are grid points: equal or not
    np.testing.assert_array_equal(result.shift_px, ref.shift_px)
    # Posteriors are softmaxes of float32 log-likelihoods, which a worker (one torch thread) can
    # sum in another order than this process: a particle near 0.5 moved by 6e-5 (session 11).
    np.testing.assert_allclose(result.max_prob, ref.max_prob, rtol=0, atol=POST_ATOL)
    np.testing.assert_allclose(result.class_posterior, ref.class_posterior, rtol=0, atol=POST_ATOL)
    np.testing.assert_array_equal(result.counts, ref.counts)


def test_shard_bounds_contiguous_in_order():
    b = shard_bounds(10, 3)
    assert b.tolist() == [0, 3, 6, 10]
    assert shard_bounds(2, 5).tolist() == [0, 1, 2]  # never an empty shard
    assert shard_bounds(7, 1).tolist() == [0, 7]


def test_shards_reduce_to_the_single_pass(particles):
    """pass_shard on three pieces + reduce_pass = pass_over on all (the split itself, without Dask).

    Per particle to 1e-4: MKL's float32 products held to AVX2 round by their number of rows, and
    one max posterior of 300 moved by 1.3e-5 (relative) between the shards and the whole pass."""
    eng = Engine(particles, CONFIG)
    eng.initialise()
    idx = np.arange(len(particles))
    plan = eng.plan(CONFIG.n_online_iterations, online=False)
    (num, den, counts, nsum, ncnt), per = eng.pass_over(idx, plan, "soft", CONFIG.n_online_iterations)
    b = shard_bounds(len(idx), 3)
    shards = [eng.pass_shard(idx[b[i]:b[i + 1]], plan, "soft") for i in range(3)]
    (num3, den3, counts3, nsum3, ncnt3), per3 = eng.reduce_pass(shards)
    tol = CLASS_RTOL * float(num.abs().max())
    assert float((num3 - num).abs().max()) <= tol
    assert float((den3 - den).abs().max()) <= CLASS_RTOL * float(den.abs().max())
    np.testing.assert_allclose(counts3.numpy(), counts.numpy(), rtol=1e-6)
    np.testing.assert_allclose(nsum3.numpy(), nsum.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(ncnt3.numpy(), ncnt.numpy())
    assert per3.keys() == per.keys()
    for key in per:
        np.testing.assert_allclose(per3[key], per[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def shared_cluster():
    """One local cluster of 3 single-threaded worker processes, scaled down by the tests (starts once)."""
    with _local_cluster(3) as cluster, Client(cluster, set_as_default=False) as client:
        yield cluster, client


@pytest.mark.parametrize("n_workers", [3, 2, 1])
def test_workers_give_the_single_process_result(particles, reference, shared_cluster, n_workers):
    cluster, client = shared_cluster
    cluster.scale(n_workers)
    deadline = time.monotonic() + 60
    while len(client.scheduler_info()["workers"]) != n_workers and time.monotonic() < deadline:
        time.sleep(0.05)
    result, dask_pass = _run_distributed(particles, client)
    assert_same_result(result, reference)
    # The two full passes ran on the workers, one contiguous shard each; online ones did not.
    assert [s["iteration"] for s in dask_pass.stats] == [2, 3]
    for s in dask_pass.stats:
        assert s["workers"] == n_workers
        assert s["shard_sizes"] == np.diff(shard_bounds(len(particles), n_workers)).tolist()
        assert s["bytes_sent"] > 0 and s["bytes_received"] > 0


class _SlowShards(WorkerPlugin):
    """Every shard task sleeps first (on every worker, replacements too), so a kill lands mid-task."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def setup(self, worker) -> None:
        import cryo2d.em.distributed as dist

        if getattr(dist.run_shard, "slowed", False):
            return
        original, delay_s = dist.run_shard, self.delay_s

        def slow(task):
            time.sleep(delay_s)
            return original(task)

        slow.slowed = True
        dist.run_shard = slow


class _Interrupted(SchedulerPlugin):
    """Records shard tasks taken away from a worker while it was running them."""

    def __init__(self) -> None:
        self.keys: list = []

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if start == "processing" and finish != "memory" and "cryo2d-shard" in str(key):
            self.keys.append(key)


def test_worker_killed_mid_pass_is_replaced_and_result_unchanged(particles, reference):
    with _local_cluster(2) as cluster, Client(cluster, set_as_default=False) as client:
        client.register_plugin(_SlowShards(0.6))
        interrupted = _Interrupted()
        cluster.scheduler.add_plugin(interrupted)
        pids = client.run(os.getpid)
        killed: list = []

        def kill_first_busy_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if any("cryo2d-shard" in str(k) for k in keys)]
                if busy and busy[0] in pids:
                    time.sleep(0.2)  # well inside the task's sleep
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
        killer.start()
        result, dask_pass = _run_distributed(particles, client)
        killer.join()
        client.wait_for_workers(2, timeout=60)  # the nanny started a replacement
        workers = set(client.scheduler_info()["workers"])
    assert killed and interrupted.keys, "the kill did not hit a running shard"
    assert killed[0] not in workers and len(workers) == 2
    assert_same_result(result, reference)
    assert [s["iteration"] for s in dask_pass.stats] == [2, 3]


def test_bad_scale_out_arguments(particles):
    with pytest.raises(Cryo2DError, match="at least 1"):
        with dask_client(workers=0):
            pass
    with pytest.raises(Cryo2DError, match="one of"):
        with dask_client(workers=1, scheduler="tcp://127.0.0.1:9"):
            pass
    with pytest.raises(Cryo2DError, match=r"--scheduler tcp://127.0.0.1:9: cannot connect"):
        with dask_client(scheduler="tcp://127.0.0.1:9", timeout_s=1):
            pass
    from dataclasses import replace
    from pathlib import Path

    with pytest.raises(Cryo2DError, match="STAR, .cs or .csg file"):  # an in-memory set: its pixels would travel
        source_of(replace(particles, source=Path("mem")))


def test_workers_read_the_images_as_the_run_does(particles):
    """An inverted set (cryo2d.contrast) goes to the workers as a source that reads its images inverted."""
    import numpy as np

    from cryo2d.classify import subset_particles
    from cryo2d.contrast import invert_contrast

    rows = np.array([5, 7, 250])
    inverted = invert_contrast(subset_particles(particles, rows))
    for kept, expected in ((subset_particles(particles, rows), 1.0), (inverted, -1.0)):
        source = source_of(kept, rows=rows)
        assert source.invert_contrast == (expected < 0)
        np.testing.assert_array_equal(source.open().stack.read(np.arange(3)), expected * particles.stack.read(rows))


def test_workers_start_from_the_input_origins(particles, tmp_path):
    """A STAR file's origins reach the workers' particles (they re-read the file), subset as the run's rows."""
    import numpy as np
    import starfile

    from cryo2d.classify import subset_particles
    from cryo2d.io import read_particles

    blocks = starfile.read(particles.source, always_dict=True)
    origins = np.random.default_rng(0).uniform(-3, 3, size=(len(particles), 2))
    blocks["particles"]["rlnOriginX"], blocks["particles"]["rlnOriginY"] = origins[:, 0], origins[:, 1]
    star = tmp_path / "particles.star"
    starfile.write(blocks, star)
    (tmp_path / "particles.mrcs").symlink_to(particles.source.parent / "particles.mrcs")
    rows = np.array([5, 7, 250])
    kept = subset_particles(read_particles(star), rows)
    np.testing.assert_allclose(kept.prior_shift_px, -origins[rows], atol=1e-5)
    np.testing.assert_array_equal(source_of(kept, rows=rows).open().prior_shift_px, kept.prior_shift_px)


@pytest.mark.parametrize("flag, message", [
    (["--workers", "0"], "cryo2d: error: --workers must be at least 1 (got 0)"),
    (["--scheduler", "nonsense"], "cryo2d: error: --scheduler nonsense: not a scheduler address (missing port number"),
    (["--scheduler", ""], "cryo2d: error: --scheduler : not a scheduler address (missing port number in address '')"),
    (["--scheduler", "tcp://node1"], "cryo2d: error: --scheduler tcp://node1: not a scheduler address"),
])
def test_cli_bad_scale_out_is_one_line(particles, tmp_path, capsys, flag, message):
    from cryo2d.cli.main import main

    code = main(["classify", str(particles.source), "-o", str(tmp_path / "job"), "--classes", "3", *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith(message) and "Traceback" not in "\n".join(err)


def test_cli_workers_match_single_process(particles, tmp_path):
    """``cryo2d classify --workers 2`` writes the classes a single process writes."""
    import mrcfile
    import starfile

    from cryo2d.cli.main import main

    args = ["--classes", "3", "--online-iterations", "2", "--batch-per-class", "20", "--full-iterations", "2"]
    assert main(["classify", str(particles.source), "-o", str(tmp_path / "one"), *args]) == 0
    assert main(["classify", str(particles.source), "-o", str(tmp_path / "two"), *args, "--workers", "2"]) == 0
    one, two = (mrcfile.read(tmp_path / j / "classes.mrcs") for j in ("one", "two"))
    np.testing.assert_allclose(two, one, rtol=0, atol=CLASS_RTOL * float(np.abs(one).max()))
    t1, t2 = (starfile.read(tmp_path / j / "particles.star", always_dict=True)["particles"] for j in ("one", "two"))
    for column in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_array_equal(t2[column].to_numpy(), t1[column].to_numpy())


def test_workers_read_relative_names_from_the_clients_folder(particles, tmp_path, monkeypatch):
    """A STAR file's image names relative to the client's current folder (RELION's project folder) reach the
    client's stacks from a worker started elsewhere, not a file of the same name in the worker's folder."""
    import pickle

    import mrcfile
    import starfile

    from cryo2d.io import read_particles

    project, elsewhere = tmp_path / "proj", tmp_path / "wd"
    job = project / "Extract" / "job1"
    job.mkdir(parents=True)
    (job / "particles.mrcs").symlink_to(particles.source.parent / "particles.mrcs")
    blocks = starfile.read(particles.source, always_dict=True)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@Extract/job1/particles.mrcs" for i in range(len(particles))]
    starfile.write(blocks, job / "particles.star")
    decoy = elsewhere / "Extract" / "job1"
    decoy.mkdir(parents=True)
    with mrcfile.new(decoy / "particles.mrcs") as m:  # what the worker's own folder would find
        m.set_data(np.zeros((len(particles), particles.stack.box, particles.stack.box), dtype=np.float32))
    monkeypatch.chdir(project)
    source = source_of(read_particles("Extract/job1/particles.star"), rows=np.array([5, 7, 250]))
    monkeypatch.chdir(elsewhere)
    opened = pickle.loads(pickle.dumps(source)).open()  # as a worker gets it
    np.testing.assert_array_equal(opened.stack.read(np.arange(3)), particles.stack.read(np.array([5, 7, 250])))


def test_local_cluster_worker_errors_are_not_logged(capfd):
    """A task's error reaches the caller alone: the workers print no "Compute Failed" blocks before cryo2d's line."""
    with dask_client(workers=1) as client:
        with pytest.raises(ValueError):
            client.submit(int, "not a number").result()
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err


@pytest.mark.parametrize("address", ["tls://127.0.0.1:9", "ucx://127.0.0.1:9", "inproc://x"])
def test_scheduler_protocols_other_than_tcp_are_refused_at_once(address):
    t0 = time.monotonic()
    with pytest.raises(Cryo2DError, match=rf"--scheduler {address}: \w+:// is not supported \(only tcp://"):
        with dask_client(scheduler=address, timeout_s=1):
            pass
    assert time.monotonic() - t0 < 1.0  # no Client was built (one left half made hung for 20 s at exit)


def test_workers_read_a_result_group(particles, tmp_path):
    """A CryoSPARC result group (.csg) goes to the workers as itself: they read its particles as the client does."""
    import pickle

    from cryo2d.io import read_particles
    from cryo2d.io.cs import structured
    from cryo2d.io.csg import result_group_text

    n, box = len(particles), particles.stack.box
    (tmp_path / "J1").mkdir()
    (tmp_path / "J1" / "stack.mrcs").symlink_to(particles.source.parent / "particles.mrcs")
    array = structured([
        ("uid", np.arange(n, dtype=np.uint64) + 100), ("blob/path", np.full(n, b"J1/stack.mrcs", dtype="S16")),
        ("blob/idx", np.arange(n, dtype=np.uint32)), ("blob/shape", np.full((n, 2), box, dtype=np.uint32)),
        ("blob/psize_A", np.asarray(particles.pixel_size_angst, dtype=np.float32)),
    ])
    with open(tmp_path / "J1" / "particles.cs", "wb") as f:
        np.save(f, array)
    csg = tmp_path / "J1" / "particles.csg"
    csg.write_text(result_group_text("particles.cs", array.dtype.names, n), encoding="utf-8")
    group = read_particles(csg, project_dir=tmp_path, no_ctf=True)
    source = source_of(group, project_dir=tmp_path, rows=np.array([5, 7, 250]))
    assert source.path == str(csg.resolve()) and source.no_ctf
    opened = pickle.loads(pickle.dumps(source)).open()
    np.testing.assert_array_equal(opened.stack.read(np.arange(3)), particles.stack.read(np.array([5, 7, 250])))


def test_scheduler_lost_mid_pass_is_one_line(particles):
    """The scheduler stops while a pass runs: a Cryo2DError naming it, not a KeyError from Dask's empty info."""
    cluster = _local_cluster(1)
    client = Client(cluster.scheduler_address, timeout="2s", set_as_default=False)
    try:
        client.register_plugin(_SlowShards(3.0))
        eng = Engine(particles, CONFIG)
        eng.initialise()
        dask_pass = DaskPass(client, source_of(particles), eng)
        it = CONFIG.n_online_iterations
        plan = eng.plan(it, online=False)
        threading.Timer(1.0, cluster.close).start()  # while the shard sleeps
        with pytest.raises(Cryo2DError, match=rf"Dask scheduler {cluster.scheduler_address}: connection lost "
                                              rf"during iteration {it + 1}"):
            dask_pass(np.arange(len(particles)), plan, "soft", it)
        with pytest.raises(Cryo2DError, match="connection lost"):  # the next pass (a stream's next update) too
            DaskPass(client, source_of(particles), eng)
    finally:
        client.close()
        cluster.close()


def test_workers_read_the_clients_rows_of_a_file_that_grew(particles, tmp_path):
    """A stream's growing STAR file names more rows, and a stack still being written, by the time a worker
    opens it: the worker reads the rows the client read, from the client's stacks (not an error saying the
    file differs between machines)."""
    import pickle
    import shutil

    from cryo2d.io import read_particles

    shutil.copy(particles.source.parent / "particles.mrcs", tmp_path / "m1.mrcs")
    lines = particles.source.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if "@particles.mrcs" in line)
    header, rows = lines[:first], [line.replace("@particles.mrcs", "@m1.mrcs") for line in lines[first:]]
    star = tmp_path / "particles.star"
    star.write_text("".join(header + rows[:100]))
    client = read_particles(star)
    source = source_of(client, rows=np.arange(100))  # what a stream's update sends for this file
    # Then the writer adds rows of a new stack whose name sorts first; its stack is still being written.
    (tmp_path / "a0.mrcs").write_bytes((tmp_path / "m1.mrcs").read_bytes()[:2000])
    star.write_text("".join(header + rows[:100] + [r.replace("@m1.mrcs", "@a0.mrcs") for r in rows[100:150]]))
    opened = pickle.loads(pickle.dumps(source)).open()
    assert len(opened) == 100
    np.testing.assert_array_equal(opened.stack.read(np.arange(100)), client.stack.read(np.arange(100)))
    np.testing.assert_array_equal(opened.ctf.defocus_u_angst, client.ctf.defocus_u_angst[:100])


def test_ctrl_c_while_the_local_cluster_starts_is_a_clean_interrupt(capfd):
    """Ctrl-C while the nannies start their workers: KeyboardInterrupt ("cryo2d: interrupted") once the
    cluster is closed, not Dask's "Nanny failed to start" tracebacks."""
    import multiprocessing

    before = len(multiprocessing.active_children())
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with dask_client(workers=1):
                time.sleep(30)  # not reached when the signal is held, then raised, at the start
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 25
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed to start" not in err, err
    deadline = time.monotonic() + 10
    while len(multiprocessing.active_children()) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(multiprocessing.active_children()) <= before
