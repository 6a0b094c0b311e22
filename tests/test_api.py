"""The package-level Python API (STYLE.md: ``__init__`` re-exports what users need; DESIGN §1)."""
from __future__ import annotations

import inspect
import subprocess
import sys

import mrcfile
import numpy as np
import starfile


def test_the_package_level_functions_run_a_job_and_select_from_it(sim3, tmp_path):
    """``cryo2d.read_particles``, ``cryo2d.classify``, ``cryo2d.select`` as a notebook would call them:
    the same files as the command line, read back by mrcfile and starfile."""
    import cryo2d

    particles = cryo2d.read_particles(sim3.star)
    assert len(particles) == 300
    config = cryo2d.EMConfig(n_classes=3, n_online_iterations=2, batch_size_per_class=20, seed=0)
    result = cryo2d.classify(particles, tmp_path / "job", config)
    assert isinstance(result, cryo2d.classify.ClassifyResult)
    classes = mrcfile.read(tmp_path / "job" / "classes.mrcs")
    np.testing.assert_array_equal(classes, result.classes)
    table = starfile.read(tmp_path / "job" / "particles.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(table["rlnClassNumber"].to_numpy(), result.assignments.class_index + 1)

    chosen = cryo2d.select(tmp_path / "job", tmp_path / "sel", classes=[1])
    kept = starfile.read(tmp_path / "sel" / "particles.star", always_dict=True)["particles"]
    assert chosen.n_kept == len(kept) == int(np.sum(result.assignments.class_index == 0)) > 0
    assert list(chosen.classes) == [1]


def test_the_callable_modules_stay_modules():
    """``cryo2d.classify`` is the module (its other names, ``import cryo2d.classify``) and calls its function."""
    import cryo2d
    import cryo2d.classify as module
    from cryo2d import classify, simulate
    from cryo2d.classify import classify as function

    assert classify is module is cryo2d.classify and callable(module)
    assert function is module.classify and function is not module
    assert simulate.SimulatedData is cryo2d.simulate.SimulatedData
    assert inspect.signature(classify) == inspect.signature(function)  # a notebook's call tip
    assert {"classify", "select", "simulate", "stream", "rebalance", "read_particles", "EMConfig"} <= set(dir(cryo2d))


def test_importing_the_package_alone_does_not_load_torch():
    code = "import sys, cryo2d; assert 'torch' not in sys.modules, 'torch loaded'; cryo2d.EMConfig; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
