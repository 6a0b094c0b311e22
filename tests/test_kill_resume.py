"""kill -9 during ``cryo2d classify``, then ``--resume``: the same result as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

ARGS = ["--classes", "3", "--online-iterations", "6", "--batch-per-class", "40", "--seed", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cryo2d.simulate import bundled_map_path, read_map, simulate, write_simulation

    sim = simulate(*read_map(bundled_map_path()), n_particles=240, box=32, snr=1.0, junk_fraction=0.0,
                   views="discrete", n_views=3, rare_view_fraction=0.0, seed=3)
    return write_simulation(sim, tmp_path_factory.mktemp("data")) / "particles.star"


def _classify(star: Path, job: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cryo2d", "classify", str(star), "-o", str(job), *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _records(job: Path) -> list[dict]:
    log = job / "iterations.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _outputs(job: Path):
    table = starfile.read(job / "particles.star", always_dict=True)["particles"]
    return mrcfile.read(job / "classes.mrcs"), table, [r["iteration"] for r in _records(job)]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    job = tmp_path_factory.mktemp("full")
    assert _classify(dataset, job).wait(timeout=600) == 0
    return _outputs(job)


@pytest.mark.parametrize("kill_after", [1, 3, 5])
def test_kill_then_resume_matches_uninterrupted_run(dataset, uninterrupted, tmp_path, kill_after):
    job = tmp_path / "job"
    proc = _classify(dataset, job)
    deadline = time.monotonic() + 300
    while len(_records(job)) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Whatever the moment, nothing that looks like a finished output is there.
    assert not (job / "classes.mrcs").exists() and not (job / "particles.star").exists()
    assert _classify(dataset, job, "--resume").wait(timeout=600) == 0
    classes, table, iterations = _outputs(job)
    ref_classes, ref_table, ref_iterations = uninterrupted
    np.testing.assert_array_equal(classes, ref_classes)
    assert table.equals(ref_table)
    assert iterations == ref_iterations == list(range(1, 8))
