"""cryo2d select: class choice by number and by criteria, junk scores, written files.

The jobs here are built from a simulation without running the engine: one
class per true view and per junk kind (noise, ice, doublet), class averages
= the average of the class's particles aligned with their true poses (noisy,
CTF not corrected), sorted by count like ``cryo2d classify``.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
import yaml

import cryo2d.select as select_module
from cryo2d.cli.main import main
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import rotate_images, shift_images
from cryo2d.io import read_particles, write_particles, write_stack
from cryo2d.junk import junk_features, junk_scores
from cryo2d.particles import Assignments
from cryo2d.select import SelectionCriteria, choose_classes, parse_class_list, read_job, select, small_classes_note

JUNK = ("noise", "ice", "doublet")


# ---------------------------------------------------------------------------
# fixtures (imported by test_rebalance.py and test_view.py)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sim_data(bundled_volume, tmp_path_factory):
    """900 particles, 48 px, SNR 0.1, 4 discrete views (view 3 rare, 5 %), 15 % junk."""
    from cryo2d.simulate import simulate, write_simulation

    sim = simulate(*bundled_volume, n_particles=900, box=48, snr=0.1, junk_fraction=0.15,
                   views="discrete", n_views=4, rare_view_fraction=0.05, seed=0)
    folder = tmp_path_factory.mktemp("sim_select")
    write_simulation(sim, folder)
    return folder, sim


def aligned_images(folder: Path, truth: pd.DataFrame) -> np.ndarray:
    """(n, box, box) particles moved back to their view's frame with the true pose (junk: as is)."""
    particles = read_particles(folder / "particles.star")
    images = torch.from_numpy(particles.stack.read(np.arange(len(particles))))
    posed = truth["kind"].isin(["particle", "doublet"]).to_numpy()
    psi = np.where(posed, truth["psi_deg"].fillna(0.0), 0.0)
    shift = np.where(posed[:, None], truth[["shift_x_px", "shift_y_px"]].fillna(0.0).to_numpy(), 0.0)
    return rotate_images(shift_images(images, torch.from_numpy(-shift)), torch.from_numpy(-psi)).numpy()


def write_job(folder: Path, sim_folder: Path, class_index: np.ndarray, averages: np.ndarray,
              resolution_angst: np.ndarray | None = None, rows: np.ndarray | None = None) -> Path:
    """Write a job folder as ``cryo2d classify`` does, from given labels and averages.

    class_index : (n,) 0-based class per particle of the simulation; ``rows``
    limits the particles written (default all).
    """
    folder.mkdir(parents=True, exist_ok=True)
    particles = read_particles(sim_folder / "particles.star")
    n, K = len(particles), len(averages)
    assignments = Assignments(
        class_index=np.asarray(class_index, dtype=np.int64), psi_deg=np.zeros(n), shift_px=np.zeros((n, 2)),
        max_prob=np.ones(n), class_posterior=np.ones(n), class_ess=np.ones(n), scale=np.ones(n),
        keep=np.ones(n, dtype=bool),
    )
    rows = np.arange(n) if rows is None else np.asarray(rows)
    write_particles(particles, folder / "particles.star", assignments=assignments, rows=rows)
    write_stack(folder / "classes.mrcs", averages, float(particles.pixel_size_angst[0]))
    counts = np.bincount(np.asarray(class_index)[rows], minlength=K)
    table = pd.DataFrame({
        "rlnReferenceImage": [f"{k + 1:06d}@classes.mrcs" for k in range(K)],
        "rlnClassNumber": np.arange(1, K + 1),
        "rlnClassParticleCount": counts,
        "rlnClassDistribution": counts / max(counts.sum(), 1),
        "rlnEstimatedResolution": np.full(K, 20.0) if resolution_angst is None else resolution_angst,
    })
    starfile.write({"classes": table}, folder / "classes.star", overwrite=True)
    return folder


@pytest.fixture(scope="session")
def truth_job(sim_data, tmp_path_factory):
    """(job folder, name per class) for the 'perfect' classification of ``sim_data``."""
    folder, sim = sim_data
    truth = sim.truth
    n_views = sim.view_projections.shape[0]
    label = np.where(truth["kind"] == "particle", truth["view"], -1)
    for j, kind in enumerate(JUNK):
        label = np.where(truth["kind"] == kind, n_views + j, label)
    names = [f"view{v}" for v in range(n_views)] + list(JUNK)
    counts = np.bincount(label, minlength=len(names))
    order = np.argsort(-counts, kind="stable")  # largest class first, as classify sorts
    new = np.empty_like(order)
    new[order] = np.arange(len(order))
    class_index = new[label]
    aligned = aligned_images(folder, truth)
    averages = np.stack([aligned[class_index == k].mean(0) for k in range(len(names))]).astype(np.float32)
    job = write_job(tmp_path_factory.mktemp("truth_job") / "job", folder, class_index, averages)
    return job, [names[o] for o in order]


def _copy_job(job: Path, dest: Path) -> Path:
    shutil.copytree(job, dest)
    return dest


# ---------------------------------------------------------------------------
# automatic selection
# ---------------------------------------------------------------------------


def test_auto_select_rejects_junk_and_keeps_rare_view(truth_job, sim_data, tmp_path):
    job, names = truth_job
    rare = f"view{sim_data[1].rare_view}"
    result = select(job, tmp_path / "auto")
    kept_names = {names[c - 1] for c in result.classes}
    assert kept_names == {f"view{v}" for v in range(4)}, kept_names
    assert rare in kept_names
    truth = sim_data[1].truth
    kept = starfile.read(tmp_path / "auto" / "particles.star")["particles"]
    rejected = starfile.read(tmp_path / "auto" / "rejected.star")["particles"]
    kept_idx = kept["rlnImageName"].str.partition("@")[0].astype(int).to_numpy() - 1
    rejected_idx = rejected["rlnImageName"].str.partition("@")[0].astype(int).to_numpy() - 1
    assert (truth["kind"].to_numpy()[kept_idx] == "particle").all()
    assert set(truth["kind"].to_numpy()[rejected_idx]) == set(JUNK)
    assert len(kept) + len(rejected) == len(truth)
    assert (truth["view"].to_numpy()[kept_idx] == sim_data[1].rare_view).sum() == (truth["view"] == sim_data[1].rare_view).sum()


def test_junk_scores_of_clean_views_are_zero(sim_data):
    assert (junk_scores(sim_data[1].view_projections) == 0).all()


def _disc(box: int, centre: tuple[float, float], radius: float, soft: float = 1.5) -> np.ndarray:
    y, x = np.indices((box, box)) - box // 2
    r = np.hypot(x - centre[0], y - centre[1])
    return 1.0 / (1.0 + np.exp((r - radius) / soft))


def test_junk_features_known_shapes(sim_data):
    box = 48
    rng = np.random.default_rng(0)
    view = sim_data[1].view_projections[0]
    gauss = np.exp(-np.hypot(*(np.indices((box, box)) - box // 2)) ** 2 / (2 * 6.0**2))
    ring = _disc(box, (0, 0), 12) - _disc(box, (0, 0), 7)
    shifted = np.roll(view, (12, 10), axis=(0, 1))
    noise = rng.normal(size=(box, box))
    features = junk_features(np.stack([view, gauss, ring, shifted, noise]))
    scores = junk_scores(np.stack([view, gauss, ring, shifted, noise]))
    assert features["blob"][1] > 0.97 and features["blob"][2] < 0.5  # a Gaussian is a blob, a ring is not
    assert scores[0] == 0 and scores[1] == 1 and scores[2] == 0
    assert features["offcentre"][3] > 0.35 and scores[3] == 1
    assert features["contrast"][4] < 1.5 and scores[4] == 1
    # rotation invariant: a 90° turn changes nothing
    noisy = view + 0.1 * view.std() * rng.normal(size=(box, box))
    turned = np.roll(np.rot90(noisy), 1, axis=0)  # 90° about pixel (box//2, box//2)
    np.testing.assert_allclose(junk_features(turned[None]).to_numpy(), junk_features(noisy[None]).to_numpy(), rtol=1e-6)
    assert junk_scores(np.stack([view, view]), counts=np.array([5, 0])).tolist() == [0.0, 1.0]


def test_criteria_resolution_and_count(truth_job, tmp_path):
    job_dir = _copy_job(truth_job[0], tmp_path / "job")
    table = starfile.read(job_dir / "classes.star")
    res = np.linspace(8.0, 40.0, len(table))  # class 1 best
    table["rlnEstimatedResolution"] = res
    starfile.write({"classes": table}, job_dir / "classes.star", overwrite=True)
    job = read_job(job_dir)
    both = SelectionCriteria(min_res_angst=20.0, max_res_angst=10.0)
    expected = np.flatnonzero((res <= 20.0) & (res >= 10.0)) + 1
    assert choose_classes(job, criteria=both).tolist() == expected.tolist()
    many = SelectionCriteria(min_particles=100)
    assert choose_classes(job, criteria=many).tolist() == (np.flatnonzero(job.counts >= 100) + 1).tolist()
    # criteria narrow an explicit list
    assert choose_classes(job, classes=[1, 2, 7], criteria=SelectionCriteria(min_res_angst=20.0)).tolist() == [
        c for c in (1, 2, 7) if res[c - 1] <= 20.0
    ]


# ---------------------------------------------------------------------------
# explicit selection and the files written
# ---------------------------------------------------------------------------


def test_select_classes_writes_rows_with_all_columns(truth_job, tmp_path):
    job, _ = truth_job
    out = tmp_path / "sel"
    assert main(["select", str(job), "-o", str(out), "--classes", "1,3"]) == 0
    source = starfile.read(job / "particles.star")
    written = starfile.read(out / "particles.star")
    rejected = starfile.read(out / "rejected.star")
    pd.testing.assert_frame_equal(written["optics"], source["optics"])
    src = source["particles"]
    want = src[src["rlnClassNumber"].isin([1, 3])].reset_index(drop=True)
    pd.testing.assert_frame_equal(written["particles"], want)
    pd.testing.assert_frame_equal(rejected["particles"], src[~src["rlnClassNumber"].isin([1, 3])].reset_index(drop=True))
    with mrcfile.open(out / "templates.mrcs") as mrc, mrcfile.open(job / "classes.mrcs") as classes:
        np.testing.assert_array_equal(mrc.data, classes.data[[0, 2]])
        assert mrc.voxel_size.x == pytest.approx(float(classes.voxel_size.x))
    table = starfile.read(out / "classes.star")  # the selected rows, the job's numbers, images in templates.mrcs
    source_table = starfile.read(job / "classes.star")
    assert table["rlnClassNumber"].tolist() == [1, 3]
    assert table["rlnReferenceImage"].tolist() == [f"00000{i}@{out / 'templates.mrcs'}" for i in (1, 2)]  # outside the cwd
    np.testing.assert_array_equal(table["rlnClassParticleCount"], source_table["rlnClassParticleCount"].iloc[[0, 2]])


def test_a_selection_folder_is_not_a_job_to_select_from(truth_job, tmp_path, capsys):
    job, _ = truth_job
    assert main(["select", str(job), "-o", str(tmp_path / "sel"), "--classes", "1,3"]) == 0
    assert main(["select", str(tmp_path / "sel"), "-o", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "select folder" in err[0] and str(tmp_path / "sel") in err[0]


def test_exclude_is_the_complement(truth_job, tmp_path):
    job, names = truth_job
    assert main(["select", str(job), "-o", str(tmp_path / "ex"), "--exclude", "2-3"]) == 0
    written = starfile.read(tmp_path / "ex" / "particles.star")["particles"]
    assert sorted(written["rlnClassNumber"].unique()) == [c for c in range(1, len(names) + 1) if c not in (2, 3)]


def test_select_prints_one_line_summary(truth_job, tmp_path, capsys):
    job, names = truth_job
    assert main(["select", str(job), "-o", str(tmp_path / "s"), "--classes", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"selected 1 of {len(names)} classes (2)")


def test_classes_too_small_for_the_junk_score_get_a_note(sim_data, tmp_path, capsys):
    """Each view split into classes of 8 particles: the junk score rejects some, and select says why.

    The same particles in one class per view and one junk class: the junk
    class is rejected, with no note (the classes are large).
    """
    folder, sim = sim_data
    truth = sim.truth
    aligned = aligned_images(folder, truth)
    particle = (truth["kind"] == "particle").to_numpy()
    views = truth["view"].to_numpy()
    big = np.where(particle, views, views.max() + 1)
    label = np.full(len(truth), -1)
    for v in np.unique(views[particle]):
        members = np.flatnonzero(particle & (views == v))
        label[members] = label.max() + 1 + np.arange(len(members)) // 8
    label[~particle] = label.max() + 1  # the junk in one class
    for name, labels in (("big", big), ("small", label)):
        averages = np.stack([aligned[labels == k].mean(0) for k in range(labels.max() + 1)]).astype(np.float32)
        write_job(tmp_path / name, folder, labels, averages)
    averages = read_job(tmp_path / "small").unmasked
    counts = np.bincount(label)
    rejected_small = (junk_scores(averages, counts) > 0.5) & (counts < 100)
    assert rejected_small.sum() > 0  # classes of 8 particles of a view look like noise
    assert main(["select", str(tmp_path / "small"), "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[1].startswith(f"note: the classes hold a median of {np.median(counts):g} particles")
    assert f"rejected {rejected_small.sum()} classes of fewer than 100 ({counts[rejected_small].sum()} particles)" in out[1]
    # Classes chosen by number: no junk score, no note.
    assert main(["select", str(tmp_path / "small"), "-o", str(tmp_path / "n"), "--classes", "1-3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    # Large classes: the junk class is rejected without a note.
    job = read_job(tmp_path / "big")
    chosen = choose_classes(job)
    assert len(chosen) == job.n_classes - 1 and small_classes_note(job, chosen, SelectionCriteria.auto()) is None


def test_the_note_counts_only_classes_the_junk_score_rejected(truth_job, tmp_path, capsys):
    """Junk classes left out by --exclude or --classes were counted as rejected by the junk score.

    ``truth_job`` holds a median of about 45 particles per class, and its three
    junk classes (45 each) score as junk.
    """
    job, names = truth_job
    junk = [k + 1 for k, name in enumerate(names) if name in JUNK]
    views = [k + 1 for k, name in enumerate(names) if name not in JUNK]
    counts = read_job(job).counts
    assert len(junk) == 3 and np.median(counts) < 100 and (counts[np.array(junk) - 1] < 100).all()
    out = str(tmp_path / "s")
    # The user excluded the junk: the junk score rejected nothing, so no note.
    assert main(["select", str(job), "-o", out, "--exclude", ",".join(map(str, junk)), "--max-junk-score", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"selected {len(views)} of {len(names)} classes")
    # The views and one junk class listed: the junk score rejected that one class.
    listed = ",".join(map(str, views + junk[:1]))
    assert main(["select", str(job), "-o", out, "--classes", listed, "--max-junk-score", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and f"rejected 1 classes of fewer than 100 ({counts[junk[0] - 1]} particles)" in lines[1]
    # Junk classes that --min-particles rejects as well are not the junk score's doing.
    size = int(counts[np.array(junk) - 1].max())
    for limit, expected in ((size, 3), (size + 1, 0)):
        criteria = SelectionCriteria(min_particles=limit, max_junk_score=0.5)
        job_read = read_job(job)
        note = small_classes_note(job_read, choose_classes(job_read, criteria=criteria), criteria)
        assert (note is None) if expected == 0 else f"rejected {expected} classes" in note, (limit, note)
    # The automatic selection: all three junk classes.
    assert main(["select", str(job), "-o", out]) == 0
    assert f"rejected 3 classes of fewer than 100 ({counts[np.array(junk) - 1].sum()} particles)" in capsys.readouterr().out


def test_a_stream_job_is_read_only_between_updates(truth_job, tmp_path, monkeypatch, capsys):
    """A stream job mid-update (stream.json "writing": classes.* of the new update, particles.star of the last)
    was read as it lay: a class's templates with another class's particles."""
    job = _copy_job(truth_job[0], tmp_path / "live")
    state = {"update": 2, "particles": 900, "status": "writing"}
    (job / "stream.json").write_text(json.dumps(state))
    monkeypatch.setattr(select_module, "_STREAM_WAIT_S", 0.0, raising=False)
    assert main(["select", str(job), "-o", str(tmp_path / "s"), "--classes", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stream.json: cryo2d stream is writing update 2" in err[0]
    assert not (tmp_path / "s").exists()
    # The stream finishes the update while select waits: the finished files are read.
    monkeypatch.setattr(select_module, "_STREAM_WAIT_S", 30.0, raising=False)
    monkeypatch.setattr(select_module, "_STREAM_POLL_S", 0.05, raising=False)
    particles = starfile.read(job / "particles.star")
    particles["particles"]["rlnClassNumber"] = 1

    def finish() -> None:
        starfile.write(particles, job / "particles.star", overwrite=True)
        (job / "stream.json").write_text(json.dumps({**state, "status": "complete"}))

    timer = threading.Timer(0.3, finish)
    timer.start()
    try:
        result = select(job, tmp_path / "s", classes=[1])
    finally:
        timer.join()
    assert result.n_kept == 900 and result.n_rejected == 0
    assert read_job(job).counts.tolist() == [900] + [0] * (len(truth_job[1]) - 1)


def test_junk_scores_read_the_unmasked_averages(truth_job, tmp_path):
    """With classes_unmasked.mrcs (written with --flatten-solvent) the junk scores read it; templates stay classes.mrcs."""
    job, names = truth_job
    flat = _copy_job(job, tmp_path / "flat")
    with mrcfile.open(job / "classes.mrcs") as mrc:
        averages, voxel = np.asarray(mrc.data), float(mrc.voxel_size.x)
    before = select(flat, tmp_path / "before").classes
    assert len(before) == 4
    # Unmasked averages of pure noise: every class scores as junk, whatever classes.mrcs shows.
    noise = np.random.default_rng(0).normal(size=averages.shape).astype(np.float32)
    write_stack(flat / "classes_unmasked.mrcs", noise, voxel)
    job_read = read_job(flat)
    np.testing.assert_array_equal(job_read.unmasked, noise)
    np.testing.assert_array_equal(job_read.averages, averages)
    assert len(select(flat, tmp_path / "noise").classes) == 0
    # The truth averages as the unmasked ones: the same selection as before; templates from classes.mrcs.
    write_stack(flat / "classes_unmasked.mrcs", averages, voxel)
    write_stack(flat / "classes.mrcs", averages * (np.abs(averages) > 0.1 * np.abs(averages).max()), voxel)
    assert list(select(flat, tmp_path / "after").classes) == list(before)
    with mrcfile.open(tmp_path / "after" / "templates.mrcs") as t, mrcfile.open(flat / "classes.mrcs") as c:
        np.testing.assert_array_equal(t.data, c.data[np.array(before) - 1])
    write_stack(flat / "classes_unmasked.mrcs", averages[:2], voxel)
    with pytest.raises(Cryo2DError, match="classes_unmasked.mrcs: shape"):
        read_job(flat)


def test_bad_class_numbers_and_missing_files(truth_job, tmp_path, capsys):
    job, names = truth_job
    with pytest.raises(Cryo2DError, match="classes.star.*class 99 does not exist"):
        select(job, tmp_path / "x", classes=[99])
    assert main(["select", str(job), "-o", str(tmp_path / "x"), "--classes", "1,a"]) == 1
    assert "--classes" in capsys.readouterr().err
    for option in ("--classes", "--exclude"):  # an empty list (a script's empty variable) was the automatic selection
        assert main(["select", str(job), "-o", str(tmp_path / "x"), option, ""]) == 1
        assert f"{option}: no class numbers given" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(Cryo2DError, match="job folder not found"):
        read_job(tmp_path / "nothing")
    broken = _copy_job(job, tmp_path / "broken")
    (broken / "classes.star").unlink()
    with pytest.raises(Cryo2DError, match="classes.star: file not found"):
        read_job(broken)
    (broken / "classes.mrcs").unlink()
    with pytest.raises(Cryo2DError, match="classes.mrcs: file not found"):
        read_job(broken)
    with pytest.raises(Cryo2DError, match="must differ from the job folder"):
        select(job, job, classes=[1])
    assert parse_class_list("3, 1-2,3") == [1, 2, 3]
    # A range far past any job's classes: the usual line, not numbers filling memory.
    huge = parse_class_list("1-100000000000")
    assert len(huge) < 200_000 and max(huge) == 100_000_000_000
    with pytest.raises(Cryo2DError, match=r"--classes class \d+ does not exist \(the job has classes 1-"):
        choose_classes(read_job(job), classes=huge)


def test_select_reads_job_from_another_folder(truth_job, tmp_path, monkeypatch):
    """The job's particles.star names stacks relative to the input's folder; select never opens them."""
    monkeypatch.chdir(tmp_path)
    result = select(truth_job[0], "rel_out", classes=[1])
    assert (tmp_path / "rel_out" / "particles.star").is_file() and result.n_kept > 0


def cs_job(job: Path, dest: Path) -> tuple[Path, np.ndarray]:
    """A copy of ``job`` whose particles are a .cs file (the same classes); returns (folder, its array)."""
    job = _copy_job(job, dest)
    star = starfile.read(job / "particles.star")["particles"]
    (job / "particles.star").unlink()
    n = len(star)
    array = np.zeros(n, dtype=[("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"),
                               ("blob/shape", "<u4", (2,)), ("alignments2D/class", "<u4"), ("alignments2D/shift", "<f4", (2,))])
    array["uid"] = np.arange(n) + 1000
    array["blob/path"] = b"particles.mrcs"
    array["blob/idx"] = np.arange(n)
    array["blob/psize_A"] = 4.0
    array["blob/shape"] = 48
    array["alignments2D/class"] = star["rlnClassNumber"].to_numpy() - 1
    array["alignments2D/shift"] = np.arange(2 * n).reshape(n, 2)
    with open(job / "particles.cs", "wb") as handle:
        np.save(handle, array)
    return job, array


def test_cs_job_writes_cs(truth_job, sim_data, tmp_path):
    """A job whose particles are a .cs file gets particles.cs / rejected.cs with every field kept."""
    job, array = cs_job(truth_job[0], tmp_path / "csjob")
    result = select(job, tmp_path / "out", classes=[2, 4])
    kept = np.load(tmp_path / "out" / "particles.cs")
    rejected = np.load(tmp_path / "out" / "rejected.cs")
    assert kept.dtype == array.dtype and result.n_kept == len(kept)
    for name, rows in (("particles", kept), ("rejected", rejected)):  # CryoSPARC's Import Result Group reads these
        group = yaml.safe_load((tmp_path / "out" / f"{name}.csg").read_text())
        assert group["group"]["name"] == name and set(group["results"]) == {"blob", "alignments2D"}
        assert group["results"]["blob"] == {"metafile": f">{name}.cs", "num_items": len(rows), "type": "particle.blob"}
    mask = np.isin(array["alignments2D/class"], [1, 3])
    np.testing.assert_array_equal(kept, array[mask])
    np.testing.assert_array_equal(rejected, array[~mask])
    assert not (tmp_path / "out" / "particles.star").exists()
    selection = read_job(tmp_path / "out", selection=True)  # classes 2 and 4 of the job, in that order
    assert selection.numbers.tolist() == [2, 4] and selection.n_classes == 2
    np.testing.assert_array_equal(selection.class_number, np.where(kept["alignments2D/class"] == 1, 1, 2))


def test_reselect_into_a_folder_removes_the_other_formats_files(truth_job, tmp_path):
    """A .cs job's selection into a STAR job's selection folder: its particles.star went on being read."""
    job = truth_job[0]
    csjob, array = cs_job(job, tmp_path / "csjob")
    out = tmp_path / "sel"
    select(job, out, classes=[1, 2])
    select(csjob, out, classes=[3])
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.star", "particles.cs", "particles.csg", "rejected.cs", "rejected.csg", "templates.mrcs"]
    selection = read_job(out, selection=True)
    assert selection.particles.kind == "cs" and selection.numbers.tolist() == [3]
    assert (selection.class_number == 1).sum() == (array["alignments2D/class"] == 2).sum() > 0
    select(job, out, classes=[4])  # and back: no .cs or .csg left
    assert sorted(p.name for p in out.iterdir()) == ["classes.star", "particles.star", "rejected.star", "templates.mrcs"]
    assert read_job(out, selection=True).numbers.tolist() == [4]


@pytest.mark.parametrize("marker", ["checkpoint.pt", "iterations.jsonl", "stream.json", "classes.mrcs"])
def test_select_refuses_another_jobs_folder(truth_job, tmp_path, capsys, marker):
    """select -o into another classification job replaced its particles.star and classes.star, breaking it."""
    job = truth_job[0]
    other = tmp_path / "other"
    other.mkdir()
    for name in ("particles.star", "classes.star", marker):
        shutil.copy(job / ("classes.mrcs" if name == marker else name), other / name)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main(["select", str(job), "-o", str(other), "--classes", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cryo2d: error: {other}: holds a classification job ({marker}); choose another folder"]
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    copy = _copy_job(job, tmp_path / "copy")  # a whole job folder as classify writes it
    (copy / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(Cryo2DError, match=r"copy: holds a classification job \(checkpoint.pt\)"):
        select(job, copy, classes=[1])


def test_select_refuses_particle_files_it_did_not_write(truth_job, sim_data, tmp_path):
    """The folder of the particle file a job was classified from, or the job's own file by another path."""
    job = truth_job[0]
    source = tmp_path / "input"
    source.mkdir()
    shutil.copy(sim_data[0] / "particles.star", source / "particles.star")
    before = (source / "particles.star").read_bytes()
    with pytest.raises(Cryo2DError, match="input: holds particles.star, not written by cryo2d select or rebalance"):
        select(job, source, classes=[1])
    assert (source / "particles.star").read_bytes() == before and sorted(source.iterdir()) == [source / "particles.star"]
    # A job whose particles.star is a link into a selection folder: selecting into that folder would replace it.
    select(job, tmp_path / "sel", classes=list(range(1, 8)))
    linked = _copy_job(job, tmp_path / "linked")
    (linked / "particles.star").unlink()
    (linked / "particles.star").symlink_to(tmp_path / "sel" / "particles.star")
    with pytest.raises(Cryo2DError, match="would write particles.star over its input"):
        select(linked, tmp_path / "sel", classes=[1])
    assert read_job(tmp_path / "sel", selection=True).numbers.tolist() == list(range(1, 8))


def test_job_markers_cover_the_files_of_a_job():
    """Every file a classification or stream job writes, and select or rebalance never does, marks a job."""
    from cryo2d.classify import JOB_FILES
    from cryo2d.select import JOB_MARKERS, OUTPUT_FILES
    from cryo2d.stream import CHECKPOINT

    assert set(JOB_FILES) - set(OUTPUT_FILES) <= set(JOB_MARKERS)
    assert {CHECKPOINT, "stream.json", "updates.jsonl"} <= set(JOB_MARKERS)
    assert not set(JOB_MARKERS) & set(OUTPUT_FILES)


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_particles=-1), "--min-particles must be >= 0, got -1"),
    (dict(min_res_angst=-3.0), "--min-res must be positive"),
    (dict(max_res_angst=0.0), "--max-res must be positive"),
    (dict(max_junk_score=-1.0), r"--max-junk-score must be in \[0, 1\], got -1"),
    (dict(max_junk_score=1.5), r"--max-junk-score must be in \[0, 1\], got 1.5"),
])
def test_criteria_that_make_no_sense_are_refused(kwargs, message):
    """A negative resolution or a junk score outside [0, 1] used to select nothing (or everything) silently."""
    with pytest.raises(Cryo2DError, match=message):
        SelectionCriteria(**kwargs)
    assert SelectionCriteria(min_particles=0, max_junk_score=0.0).describe()  # the edges are allowed
