"""``cryo2d classify`` end to end: job outputs for STAR and .cs input, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import yaml
from PIL import Image

from cryo2d.cli.main import main
from cryo2d.errors import Cryo2DError

FAST = ["--classes", "3", "--online-iterations", "2", "--batch-per-class", "20", "--seed", "0"]


def _errors_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cryo2d: error:")]


def _errors(capsys) -> list[str]:
    return _errors_in(capsys.readouterr().err)


@pytest.fixture(scope="module")
def star_job(sim3, tmp_path_factory):
    job = tmp_path_factory.mktemp("cli") / "job"
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST]) == 0
    return job


def test_note_on_ctf_boosting_b_factors(sim3, tmp_path, capsys, helpers):
    """Negative B-factors (a tilt-series export's dose) boost the CTF: one note names the file and the boost."""
    blocks, _, b_1000x = helpers.relocatable_star(sim3)
    for name, bfactor in (("plain", 0.0), ("dose", b_1000x)):  # 1000x at Nyquist
        star = tmp_path / f"{name}.star"
        blocks["particles"]["rlnCtfBfactor"] = bfactor
        starfile.write(blocks, star, overwrite=True)
        assert main(["classify", str(star), "-o", str(tmp_path / name), *FAST, "--full-iterations", "1"]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
        if bfactor == 0.0:
            assert notes == []
        else:
            assert len(notes) == 1 and notes[0].startswith(f"{star}: note: negative CTF B-factors")
            assert "up to 1,000x at Nyquist" in notes[0]


def test_classes_mrcs(star_job, sim3):
    with mrcfile.open(star_job / "classes.mrcs") as mrc:
        assert mrc.data.shape == (3, 32, 32) and mrc.data.dtype == np.float32
        assert float(mrc.voxel_size.x) == pytest.approx(sim3.sim.pixel_size_angst, rel=1e-5)
        assert np.isfinite(mrc.data).all()


def test_classes_unmasked_mrcs(star_job, sim3, tmp_path):
    """Flat solvent by default: classes.mrcs is classes_unmasked.mrcs times masks in [0, 1]."""
    with mrcfile.open(star_job / "classes.mrcs") as flat, mrcfile.open(star_job / "classes_unmasked.mrcs") as raw:
        assert raw.data.shape == flat.data.shape and float(raw.voxel_size.x) == float(flat.voxel_size.x)
        big = np.abs(raw.data) > 1e-3 * np.abs(raw.data).max()
        ratio = flat.data[big] / raw.data[big]
        assert ratio.min() > -1e-4 and ratio.max() < 1 + 1e-4
        assert (ratio < 1e-3).mean() > 0.1  # solvent set to zero
    # Rerun into the same folder without flat solvent: no stale unmasked file is left for select.
    job = tmp_path / "job"
    shutil.copytree(star_job, job)
    (job / "checkpoint.pt").unlink(missing_ok=True)
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST, "--no-flatten-solvent"]) == 0
    assert not (job / "classes_unmasked.mrcs").exists()
    with mrcfile.open(star_job / "classes_unmasked.mrcs") as raw, mrcfile.open(job / "classes.mrcs") as unflat:
        np.testing.assert_allclose(unflat.data, raw.data, atol=1e-6 * np.abs(raw.data).max())  # same search


def test_classes_star(star_job):
    classes = starfile.read(star_job / "classes.star")
    assert len(classes) == 3
    assert classes["rlnClassParticleCount"].sum() == 300
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0)
    assert list(classes["rlnClassParticleCount"]) == sorted(classes["rlnClassParticleCount"], reverse=True)
    assert list(classes["rlnReferenceImage"]) == [f"{k:06d}@{star_job / 'classes.mrcs'}" for k in (1, 2, 3)]  # outside the cwd
    assert (classes["rlnEstimatedResolution"] > 0).all()


def test_class_images_are_named_from_the_project_folder(sim3, tmp_path, monkeypatch):
    """classes.star names classes.mrcs as RELION names run_it025_classes.mrcs, from the folder the job
    ran in (the project folder), where particles.star's stack names also resolve: ``relion_refine
    --i Class2D/run1/particles.star --ref Class2D/run1/classes.star`` finds both from there."""
    monkeypatch.chdir(tmp_path)
    assert main(["classify", str(sim3.star), "-o", "Class2D/run1", *FAST]) == 0
    classes = starfile.read("Class2D/run1/classes.star")
    assert list(classes["rlnReferenceImage"]) == [f"{k:06d}@Class2D/run1/classes.mrcs" for k in (1, 2, 3)]
    written = mrcfile.read("Class2D/run1/classes.mrcs")
    for name in classes["rlnReferenceImage"]:
        number, stack = name.split("@")
        np.testing.assert_array_equal(mrcfile.read(stack)[int(number) - 1], written[int(number) - 1])
    assert main(["select", "Class2D/run1", "-o", "Select/job5", "--classes", "1,3"]) == 0
    templates = starfile.read("Select/job5/classes.star")
    assert list(templates["rlnReferenceImage"]) == ["000001@Select/job5/templates.mrcs", "000002@Select/job5/templates.mrcs"]


def test_particles_star(star_job, sim3):
    given = starfile.read(sim3.star, always_dict=True)
    out = starfile.read(star_job / "particles.star", always_dict=True)
    inp, got = given["particles"], out["particles"]
    assert len(got) == len(inp)
    for column in inp.columns:  # every input column kept, values untouched but the stacks' names
        assert column in got.columns
        if column != "rlnImageName":
            pd.testing.assert_series_equal(got[column], inp[column], check_names=False)
    # The stack lies beside the input STAR file, not in the current folder: named so that it is found from here.
    given_name, got_name = (t["rlnImageName"].str.partition("@") for t in (inp, got))
    pd.testing.assert_series_equal(got_name[0], given_name[0], check_names=False)
    for name, stack in zip(given_name[2], got_name[2]):
        assert stack != name and os.path.samefile(stack, sim3.star.parent / name)
    assert "optics" in out
    classes = got["rlnClassNumber"].to_numpy()
    assert classes.min() >= 1 and classes.max() <= 3
    counts = starfile.read(star_job / "classes.star")["rlnClassParticleCount"].to_numpy()
    np.testing.assert_array_equal(np.bincount(classes - 1, minlength=3), counts)
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution", "rlnNormCorrection"):
        assert column in got.columns and np.isfinite(got[column]).all(), column
    assert ((got["rlnAnglePsi"] >= 0) & (got["rlnAnglePsi"] < 360)).all()
    assert ((got["rlnMaxValueProbDistribution"] > 0) & (got["rlnMaxValueProbDistribution"] <= 1)).all()


def test_gallery_and_log(star_job):
    with Image.open(star_job / "gallery.png") as img:
        assert img.size[0] > 0 and img.size[1] > 0
    lines = (star_job / "iterations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"iteration", "particles", "resolution_angst", "class_changes", "time_s"} <= set(r)


def _cs_from_sim(sim3, folder):
    """A CryoSPARC .cs for the simulated particles (blob paths relative to the project folder)."""
    table = starfile.read(sim3.star, always_dict=True)
    parts, optics = table["particles"], table["optics"]
    n = len(parts)
    idx = np.array([int(name.split("@")[0]) - 1 for name in parts["rlnImageName"]])
    dtype = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
             ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    array = np.zeros(n, dtype=dtype)
    array["uid"] = np.arange(n) + 1000
    array["blob/path"] = b">J1/imported/particles.mrcs"
    array["blob/idx"] = idx
    array["blob/shape"] = 32
    array["blob/psize_A"] = float(optics["rlnImagePixelSize"].iloc[0])
    array["ctf/accel_kv"] = float(optics["rlnVoltage"].iloc[0])
    array["ctf/cs_mm"] = float(optics["rlnSphericalAberration"].iloc[0])
    array["ctf/amp_contrast"] = float(optics["rlnAmplitudeContrast"].iloc[0])
    array["ctf/df1_A"] = parts["rlnDefocusU"]
    array["ctf/df2_A"] = parts["rlnDefocusV"]
    array["ctf/df_angle_rad"] = np.deg2rad(parts["rlnDefocusAngle"])
    (folder / "J1" / "imported").mkdir(parents=True)
    shutil.copy(sim3.folder / "particles.mrcs", folder / "J1" / "imported" / "particles.mrcs")
    path = folder / "J1" / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, array)
    return path, array


@pytest.fixture(scope="module")
def cs_job(sim3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cs")
    cs, array = _cs_from_sim(sim3, folder)
    job = folder / "job"
    assert main(["classify", str(cs), "--project-dir", str(folder), "-o", str(job), *FAST]) == 0
    return job, array


def test_cs_input_gives_particles_cs(cs_job):
    job, array = cs_job
    out = np.load(job / "particles.cs")
    assert len(out) == len(array)
    for name in array.dtype.names:
        np.testing.assert_array_equal(out[name], array[name], err_msg=name)
    cls = out["alignments2D/class"]
    assert cls.min() >= 0 and cls.max() <= 2  # 0-based
    counts = starfile.read(job / "classes.star")["rlnClassParticleCount"].to_numpy()
    np.testing.assert_array_equal(np.bincount(cls, minlength=3), counts)
    assert out["alignments2D/shift"].shape == (len(array), 2)
    pose = out["alignments2D/pose"]
    assert np.isfinite(pose).all() and (pose >= 0).all() and (pose < 2 * np.pi + 1e-6).all()  # radians
    np.testing.assert_allclose(out["alignments2D/psize_A"], array["blob/psize_A"], rtol=1e-6)
    for name in ("alignments2D/class_posterior", "alignments2D/class_ess"):
        assert name in out.dtype.names
    assert not (job / "particles.star").exists()
    group = yaml.safe_load((job / "particles.csg").read_text())  # for CryoSPARC's Import Result Group
    assert group["results"]["alignments2D"] == {"metafile": ">particles.cs", "num_items": len(out),
                                                 "type": "particle.alignments2D"}


def test_cs_job_writes_class_averages_as_cryosparc_templates(cs_job, tmp_path):
    """class_averages.cs (+ .csg, type template): CryoSPARC's fields, blob/path from the project folder, idx = class."""
    from cryo2d.select import select

    dataset_module = pytest.importorskip("cryosparc.dataset")
    job, _ = cs_job
    project = job.parent  # the --project-dir of the fixture's run
    out = np.load(job / "class_averages.cs")
    classes = starfile.read(job / "classes.star")
    assert list(out.dtype.names) == ["uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A", "blob/sign",
                                              "blob/res_A"]
    assert set(out["blob/path"]) == {b"job/classes.mrcs"} and len(np.unique(out["uid"])) == len(out)
    np.testing.assert_array_equal(out["blob/idx"], np.arange(len(classes)))
    np.testing.assert_allclose(out["blob/res_A"], classes["rlnEstimatedResolution"], rtol=1e-6)
    with mrcfile.open(project / out["blob/path"][0].decode()) as mrc, mrcfile.open(job / "classes.mrcs") as mine:
        assert tuple(out["blob/shape"][0]) == mrc.data.shape[1:]
        np.testing.assert_array_equal(mrc.data[out["blob/idx"]], mine.data)
        np.testing.assert_allclose(out["blob/psize_A"], mine.voxel_size.x, rtol=1e-6)
    assert len(dataset_module.Dataset.load(job / "class_averages.cs")) == len(out)
    group = yaml.safe_load((job / "class_averages.csg").read_text())
    assert group["group"]["type"] == "template"
    assert group["results"] == {"blob": {"metafile": ">class_averages.cs", "num_items": len(out), "type": "template.blob"}}
    # select keeps the chosen classes' rows, as CryoSPARC's Select 2D writes templates_selected.cs
    select(job, tmp_path / "sel", classes=[1, 3])
    templates, particles = np.load(tmp_path / "sel" / "templates.cs"), np.load(tmp_path / "sel" / "particles.cs")
    np.testing.assert_array_equal(templates, out[[0, 2]])
    assert set(np.unique(particles["alignments2D/class"])) <= set(templates["blob/idx"])
    assert yaml.safe_load((tmp_path / "sel" / "templates.csg").read_text())["group"]["type"] == "template"


def test_a_result_group_classifies_as_its_cs(cs_job, tmp_path, capsys):
    """The job's particles.csg (an exported CryoSPARC group) as input: the same classification; and never over its .cs."""
    job, _ = cs_job
    project = job.parent
    assert main(["classify", str(job / "particles.csg"), "--project-dir", str(project), "-o", str(tmp_path / "again"),
                 *FAST]) == 0
    before, after = np.load(job / "particles.cs"), np.load(tmp_path / "again" / "particles.cs")
    assert after.dtype == before.dtype
    np.testing.assert_array_equal(after["alignments2D/class"], before["alignments2D/class"])
    np.testing.assert_allclose(after["alignments2D/pose"], before["alignments2D/pose"], atol=1e-6)
    capsys.readouterr()
    (tmp_path / "copy").mkdir()
    shutil.copy(job / "particles.cs", tmp_path / "copy" / "particles.cs")
    (tmp_path / "copy" / "group.csg").write_text((job / "particles.csg").read_text())
    code = main(["classify", str(tmp_path / "copy" / "group.csg"), "--project-dir", str(project),
                 "-o", str(tmp_path / "copy"), *FAST])
    assert code == 1 and "would write particles.cs over its input" in capsys.readouterr().err
    assert np.load(tmp_path / "copy" / "particles.cs").dtype == before.dtype


def test_every_file_of_a_job_is_one_the_job_guards(star_job, cs_job):
    """classify and stream refuse an input named like a job file (``JOB_FILES``): the list holds every file written."""
    from cryo2d.classify import JOB_FILES

    for job in (star_job, cs_job[0]):
        names = {path.name for path in job.iterdir()}
        assert {"classes.mrcs", "gallery.png", "iterations.jsonl"} <= names
        assert names <= set(JOB_FILES), names - set(JOB_FILES)


def test_cryosparc_tools_read_the_cs(cs_job):
    """CryoSPARC's own reader (cryosparc-tools) loads particles.cs with every field we wrote."""
    dataset_module = pytest.importorskip("cryosparc.dataset")
    job, array = cs_job
    out = np.load(job / "particles.cs")
    dataset = dataset_module.Dataset.load(job / "particles.cs")
    assert len(dataset) == len(array)
    assert set(out.dtype.names) <= set(dataset.fields())
    np.testing.assert_array_equal(dataset["uid"], array["uid"])
    for name in ("alignments2D/class", "alignments2D/pose", "alignments2D/shift", "alignments2D/class_posterior"):
        np.testing.assert_array_equal(dataset[name], out[name], err_msg=name)


def test_relion_selects_the_same_particles(star_job, tmp_path):
    """RELION's relion_star_handler reads particles.star: selecting one class gives the particles we put there."""
    handler = shutil.which("relion_star_handler")
    if handler is None:
        pytest.skip("RELION (relion_star_handler) not installed")
    ours = starfile.read(star_job / "particles.star", always_dict=True)["particles"]
    k = int(ours["rlnClassNumber"].value_counts().idxmax())
    out = tmp_path / "class.star"
    subprocess.run([handler, "--i", str(star_job / "particles.star"), "--o", str(out), "--select", "rlnClassNumber",
                    "--minval", str(k), "--maxval", str(k)], check=True, capture_output=True, cwd=tmp_path)
    got = starfile.read(out, always_dict=True)["particles"]
    want = ours[ours["rlnClassNumber"] == k]
    assert len(got) == len(want) > 0
    assert list(got["rlnImageName"]) == list(want["rlnImageName"])
    np.testing.assert_allclose(got["rlnAnglePsi"], want["rlnAnglePsi"], atol=1e-4)


def test_cs_and_star_give_the_same_classification(star_job, cs_job):
    job, _ = cs_job
    star = starfile.read(star_job / "particles.star", always_dict=True)["particles"]
    out = np.load(job / "particles.cs")
    np.testing.assert_array_equal(out["alignments2D/class"], star["rlnClassNumber"].to_numpy() - 1)
    np.testing.assert_allclose(np.rad2deg(out["alignments2D/pose"]), star["rlnAnglePsi"], atol=1e-3)
    # CryoSPARC's shift is RELION's origin in pixels (pyem's csparc2star copies it unchanged).
    origin_px = star[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / out["alignments2D/psize_A"][:, None]
    np.testing.assert_allclose(out["alignments2D/shift"], origin_px, atol=1e-4)


def test_a_job_run_again_from_the_other_format_leaves_only_its_own_files(sim3, tmp_path):
    """A .cs run into a STAR run's folder (and back): no particle file of the earlier run stays to be read instead."""
    cs, _ = _cs_from_sim(sim3, tmp_path)
    job = tmp_path / "job"
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST]) == 0
    assert (job / "particles.star").exists()
    assert main(["classify", str(cs), "--project-dir", str(tmp_path), "-o", str(job), *FAST]) == 0
    assert {p.name for p in job.glob("*particles*")} == {"particles.cs", "particles.csg"}
    assert {p.name for p in job.glob("class_averages*")} == {"class_averages.cs", "class_averages.csg"}
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST]) == 0
    assert {p.name for p in job.glob("*particles*")} == {"particles.star"}
    assert not list(job.glob("class_averages*"))


def test_a_run_stopped_in_an_earlier_jobs_folder_leaves_none_of_its_results(star_job, sim3, tmp_path):
    """A new run into a finished job's folder, stopped after its first iteration (Ctrl-C): the earlier
    run's classes and particles are gone with its log and checkpoint, not left for select to read."""
    from cryo2d.classify import JOB_FILES, classify
    from cryo2d.em.config import EMConfig

    job = tmp_path / "job"
    shutil.copytree(star_job, job)
    results = {"classes.mrcs", "classes_unmasked.mrcs", "classes.star", "particles.star", "gallery.png"}
    assert results <= {p.name for p in job.iterdir()}
    records = []

    def stop(record):
        records.append(record)
        raise KeyboardInterrupt

    config = EMConfig(n_classes=2, n_online_iterations=2, batch_size_per_class=20)
    with pytest.raises(KeyboardInterrupt):
        classify(str(sim3.star), job, config, on_iteration=stop)
    assert len(records) == 1
    assert {p.name for p in job.iterdir()} & set(JOB_FILES) == {"iterations.jsonl", "checkpoint.pt"}
    assert [json.loads(line)["iteration"] for line in (job / "iterations.jsonl").read_text().splitlines()] == [1]
    # An error before the first iteration (here: a resolution the box cannot hold) leaves the earlier job whole.
    shutil.rmtree(job)
    shutil.copytree(star_job, job)
    before = {p.name: p.read_bytes() for p in job.iterdir()}
    with pytest.raises(Cryo2DError):
        classify(str(sim3.star), job, EMConfig(n_classes=2, max_res_angst=1e4))
    assert {p.name: p.read_bytes() for p in job.iterdir()} == before
    # Resumed, the stopped run ends with its own results only.
    shutil.rmtree(job)
    shutil.copytree(star_job, job)
    with pytest.raises(KeyboardInterrupt):
        classify(str(sim3.star), job, config, on_iteration=stop)
    done = classify(str(sim3.star), job, config, resume=True)
    assert mrcfile.read(job / "classes.mrcs").shape[0] == 2 == len(done.counts)


def test_a_log_file_gets_one_line_per_iteration_and_no_bar_redraws(sim3, tmp_path, capsys):
    """stderr captured (not a terminal, like a cluster job's log): the iteration lines, no carriage returns."""
    assert main(["classify", str(sim3.star), "-o", str(tmp_path / "job"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "2D classification" not in err, err
    iterations = [line for line in err.splitlines() if line.startswith("iter ")]
    assert [line.split()[1:3] for line in iterations] == [["1", "online"], ["2", "online"], ["3", "full"]], err


def test_a_checkpoint_and_resume_that_disagree_are_named(sim3, tmp_path, capsys):
    """--resume without a checkpoint, or a checkpoint without --resume: one note, the run starts from iteration 1."""
    job = tmp_path / "job"
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{sim3.star}: no checkpoint in {job}; --resume starts from the first iteration" in err, err
    first = (job / "iterations.jsonl").read_text()
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST]) == 0
    err = capsys.readouterr().err
    assert f"{job} holds an earlier run's checkpoint; starting over (--resume continues it)" in err, err
    assert "iter   1 online" in err
    assert [json.loads(line)["class_changes"] for line in (job / "iterations.jsonl").read_text().splitlines()] == \
        [json.loads(line)["class_changes"] for line in first.splitlines()]  # a run from the start, as the first
    assert main(["classify", str(sim3.star), "-o", str(job), *FAST, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "earlier run's checkpoint" not in err and "no checkpoint in" not in err, err  # they agree: no note


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bar_only_on_a_terminal(monkeypatch, terminal):
    import io
    import time

    from cryo2d.cli.classify import progress_printer

    class Stream(io.StringIO):
        def isatty(self):
            return terminal

    stream = Stream()
    monkeypatch.setattr("sys.stderr", stream)
    record = {"phase": "online", "iteration": 1, "particles": 10, "resolution_angst": 30.0, "psi_step_deg": 6.0,
              "n_shifts": 9, "temperature": 1.0, "class_changes": 0.5, "time_s": 0.1}
    with progress_printer(2) as on_iteration:
        time.sleep(1.05)  # the bar appears after a second
        on_iteration(record)
    out = stream.getvalue()
    assert "iter   1 online n=     10 res= 30.00 Å" in out, out
    if terminal:
        assert "\r2D classification:  50%" in out, out
    else:
        assert "\r" not in out and "2D classification" not in out, out


def test_impossible_resolution_is_one_line_without_a_progress_bar(sim3, tmp_path, capsys):
    code = main(["classify", str(sim3.star), "-o", str(tmp_path / "job"), "--classes", "3", "--max-res", "1000"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == _errors_in(err) and len(err.splitlines()) == 1, err
    assert "--max-res 1000.0 Å leaves no frequencies" in err


def test_an_output_path_that_is_a_file_is_one_error_line(sim3, tmp_path, capsys):
    (tmp_path / "job").write_text("not a folder")
    assert main(["classify", str(sim3.star), "-o", str(tmp_path / "job"), *FAST]) == 1
    assert _errors(capsys) == [f"cryo2d: error: {tmp_path / 'job'}: exists and is not a folder"]
    assert (tmp_path / "job").read_text() == "not a folder"


def test_fewer_particles_than_classes(sim3, tmp_path, capsys):
    code = main(["classify", str(sim3.star), "-o", str(tmp_path / "job"), "--classes", "500"])
    assert code == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and "500" in errors[0] and "particles.star" in errors[0]


def _star_with_images(sim3, folder, change) -> Path:
    """A copy of ``sim3`` whose images are ``change``d (a function of the (n, box, box) array, in place)."""
    with mrcfile.open(sim3.folder / "particles.mrcs") as mrc:
        images = np.array(mrc.data)
        voxel = float(mrc.voxel_size.x)
    change(images)
    with mrcfile.new(folder / "particles.mrcs") as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = voxel
    shutil.copy(sim3.star, folder / "particles.star")
    return folder / "particles.star"


def _star_with_nan(sim3, folder, bad: int):
    def poison(images):
        images[bad, 5, 7] = np.nan
    return _star_with_images(sim3, folder, poison)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_pixels_are_refused_or_skipped(sim3, tmp_path, capsys):
    star = _star_with_nan(sim3, tmp_path, bad=7)
    assert main(["classify", str(star), "-o", str(tmp_path / "refused"), *FAST]) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and ("particles.mrcs" in errors[0] or "particles.star" in errors[0])
    assert not (tmp_path / "refused" / "particles.star").exists()

    assert main(["classify", str(star), "-o", str(tmp_path / "skipped"), "--skip-bad", *FAST]) == 0
    kept = starfile.read(tmp_path / "skipped" / "particles.star", always_dict=True)["particles"]
    given = starfile.read(star, always_dict=True)["particles"]
    assert len(kept) == len(given) - 1
    bad_name = given.loc[[i for i, name in enumerate(given["rlnImageName"]) if name.startswith("000008@")][0], "rlnImageName"]
    assert bad_name not in set(kept["rlnImageName"])
    assert "skipped 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0.0, 2.5])
def test_a_stack_of_constant_images_is_refused(sim3, tmp_path, capsys, value):
    """Nothing varies, so there is no noise to model: one error line, not classes of NaN."""
    star = _star_with_images(sim3, tmp_path, lambda images: images.fill(value))
    assert main(["classify", str(star), "-o", str(tmp_path / "job"), *FAST]) == 1
    errors = _errors(capsys)
    assert errors == ["cryo2d: error: particles.star: every image is constant (no pixel varies); nothing to classify"]
    assert not (tmp_path / "job" / "classes.mrcs").exists()


def test_blank_images_among_particles_are_classified(sim3, tmp_path):
    """Blank boxes (zeros, or a constant) among real images: the job runs and writes finite classes."""
    def blank(images):
        images[:12] = 0.0
        images[12:18] = 1.5
    star = _star_with_images(sim3, tmp_path, blank)
    assert main(["classify", str(star), "-o", str(tmp_path / "job"), *FAST]) == 0
    classes = mrcfile.read(tmp_path / "job" / "classes.mrcs")
    assert np.isfinite(classes).all() and float(np.abs(classes).max()) > 0
    table = starfile.read(tmp_path / "job" / "particles.star", always_dict=True)["particles"]
    assert len(table) == 300


# Each engine option of the command line, a value other than its default, and
# the EMConfig field and value it must give (DESIGN §2: no option parsed and ignored).
ENGINE_OPTIONS = [
    (["--classes", "7"], "n_classes", 7),
    (["--max-res", "12"], "max_res_angst", 12.0),
    (["--max-align-res", "15"], "max_align_res_angst", 15.0),
    (["--average-res", "4"], "average_res_angst", 4.0),
    (["--min-align-res", "150"], "min_align_res_angst", 150.0),
    (["--start", "random"], "start", "random"),
    (["--online-iterations", "9"], "n_online_iterations", 9),
    (["--batch-per-class", "33"], "batch_size_per_class", 33),
    (["--full-iterations", "3"], "n_full_iterations", 3),
    (["--uncertainty-factor", "4"], "uncertainty_factor", 4.0),
    (["--anneal-start", "5"], "anneal_start", 5),
    (["--anneal-iterations", "7"], "anneal_iterations", 7),
    (["--white-noise"], "white_noise", True),
    (["--force-max"], "force_max", True),
    (["--no-force-max"], "force_max", False),
    (["--mask-diameter", "180"], "mask_diameter_angst", 180.0),
    (["--mask-diameter-outer", "200"], "mask_diameter_outer_angst", 200.0),
    (["--no-auto-mask"], "auto_mask", False),
    (["--no-flatten-solvent"], "flatten_solvent", False),
    (["--no-recenter"], "recenter", False),
    (["--recenter-threshold", "0.4"], "recenter_threshold", 0.4),
    (["--zeropad", "1"], "zeropad", 1),
    (["--estimate-scale"], "estimate_scale", True),
    (["--clamp-solvent"], "clamp_solvent", True),
    (["--non-negative"], "non_negative", True),
    (["--align-filaments"], "align_filaments", True),
    (["--no-ctf"], "use_ctf", False),
    (["--invert-contrast"], "invert_contrast", True),
    (["--no-invert-contrast"], "invert_contrast", False),
    (["--psi-step", "6"], "psi_step_deg", 6.0),
    (["--shift-range", "4"], "shift_range_px", 4.0),
    (["--shift-step", "0.5"], "shift_step_px", 0.5),
    (["--no-input-shifts"], "input_shifts", False),
    (["--exhaustive"], "coarse_to_fine", False),
    (["--no-hard-last"], "hard_last", False),
    (["--no-empty-class"], "empty_class", False),
    (["--keep-duplicates"], "remove_duplicates", False),
    (["--min-separation", "40"], "min_separation_angst", 40.0),
    (["--no-sort"], "sort_classes", False),
    (["--tau2-fudge", "3"], "tau2_fudge", 3.0),
    (["--seed", "11"], "seed", 11),
]


def test_every_config_field_has_the_option_that_sets_it():
    """cryo2d.em.config.FLAGS (what a refused --resume names) holds each EMConfig field's own option."""
    import dataclasses

    from cryo2d.em.config import FLAGS, EMConfig

    assert set(FLAGS) == {f.name for f in dataclasses.fields(EMConfig)}
    for argv, field, _ in ENGINE_OPTIONS:
        option = argv[0].removeprefix("--no-").removeprefix("--")
        names = FLAGS[field].replace("[no-]", "").replace("--no-", "--").split("/")
        assert f"--{option}" in names, (argv, FLAGS[field])


def _engine_parser():
    import argparse

    from cryo2d.cli.classify import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser


@pytest.mark.parametrize("argv,field,value", ENGINE_OPTIONS, ids=[a[0] for a, _, _ in ENGINE_OPTIONS])
def test_each_engine_option_reaches_the_config(argv, field, value):
    """The option sets its own EMConfig field to the value given, and no other field."""
    import dataclasses

    from cryo2d.cli.classify import config_from_args

    parser = _engine_parser()
    base = config_from_args(parser.parse_args(["-o", "job"]))
    got = config_from_args(parser.parse_args(["-o", "job", *argv]))
    assert getattr(got, field) == value and getattr(base, field) != value
    changed = {f.name for f in dataclasses.fields(got) if getattr(got, f.name) != getattr(base, f.name)}
    assert changed == {field}


def test_every_engine_option_is_in_the_table():
    """A new engine option needs a row in ENGINE_OPTIONS (and so a field it reaches)."""
    options = {s for a in _engine_parser()._actions for s in a.option_strings if s.startswith("--")}
    options -= {"--help", "--out", "--device", "--threads", "--project-dir", "--skip-bad", "--resume"}
    covered = {a[0] for a, _, _ in ENGINE_OPTIONS}
    # The "on" spelling of a default-on switch sets the default: nothing to reach.
    defaults_on = {"--auto-mask", "--flatten-solvent", "--recenter", "--hard-last", "--empty-class",
                   "--remove-duplicates", "--input-shifts"}
    assert options - defaults_on == covered


@pytest.mark.parametrize(
    "preset, expected",
    [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "unset")],
)
def test_cli_limits_openmp_spinning(preset, expected):
    """The CLI caps OpenMP's spin-wait before torch loads OpenMP, unless the user chose a wait policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset)
    code = (
        "import os, sys; import cryo2d.cli.main; "
        "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", expected]


def test_abbreviated_option_is_an_error(sim3, tmp_path, capsys):
    """`--force` is not taken for `--force-max`: an unknown option ends with one error line."""
    with pytest.raises(SystemExit) as exc:
        main(["classify", str(sim3.star), "-o", str(tmp_path / "job"), "--force", *FAST])
    assert exc.value.code != 0
    assert "unrecognized arguments: --force" in capsys.readouterr().err



def test_summary_names_the_empty_box_class():
    """Its number, 1-based, and how many it holds; in words when it ended holding none (not "(0 particles)")."""
    from cryo2d.cli.classify import empty_class_summary

    counts = np.array([120.0, 0.0, 35.0])
    assert empty_class_summary(counts, 2) == "class 3 holds the empty boxes (35 particles)"
    assert empty_class_summary(counts, 1) == "class 2 is the empty-box class; no image looked empty"
    assert empty_class_summary(counts, -1) is None
