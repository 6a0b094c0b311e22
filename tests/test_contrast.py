"""The particles' contrast: dark protein is measured, inverted, and the run is the bright run."""
from __future__ import annotations

import dataclasses
import json
import shutil

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryo2d.classify import classify
from cryo2d.contrast import DARK_Z, contrast_z, invert_contrast, settle_contrast
from cryo2d.io import read_particles, write_stack
from cryo2d.io.star import write_blocks
from cryo2d.stream import stream
from conftest import memory_particles, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dark3(sim3, tmp_path_factory):
    """``sim3``'s STAR file over its images times -1 (protein dark, as cut from micrographs)."""
    folder = tmp_path_factory.mktemp("dark3")
    shutil.copy(sim3.star, folder / "particles.star")
    with mrcfile.open(sim3.folder / "particles.mrcs") as m:
        write_stack(folder / "particles.mrcs", -m.data, float(m.voxel_size.x))
    return folder / "particles.star"


def test_contrast_z_is_positive_for_bright_protein_and_odd(particles3, dark3):
    z, used = contrast_z(particles3)
    assert used == 300 and z > 20  # 300 images at SNR 10: far from the threshold
    dark, _ = contrast_z(read_particles(dark3))
    assert dark == pytest.approx(-z, rel=1e-5)
    assert contrast_z(invert_contrast(particles3))[0] == pytest.approx(-z, rel=1e-5)
    # Fewer images: evenly spread, still clear.
    assert contrast_z(particles3, n_images=30) == (pytest.approx(contrast_z(particles3, n_images=30)[0]), 30)
    assert contrast_z(particles3, n_images=30)[0] > 5


def test_hollow_particle_filling_the_box_reads_bright():
    """A shell of radius 0.41 box (a capsid in a tight box): bright, though its rim is brighter than its centre."""
    from cryo2d.simulate import simulate

    n = 64
    z, y, x = (np.mgrid[:n, :n, :n] - n // 2).astype(np.float64)
    shell = np.exp(-0.5 * (np.sqrt(x * x + y * y + z * z) - 26.0) ** 2 / 2.0**2).astype(np.float32)
    sim = simulate(shell, 3.0, n_particles=300, box=64, snr=0.1, junk_fraction=0.0, views="uniform", seed=0)
    particles = memory_particles(sim.images, sim.pixel_size_angst, sim.ctf)
    z_bright, _ = contrast_z(particles)
    assert z_bright > 5
    assert contrast_z(invert_contrast(particles))[0] == pytest.approx(-z_bright, rel=1e-5)


def test_settle_contrast_follows_the_option(particles3, dark3):
    dark = read_particles(dark3)
    rows = np.arange(5)
    auto, note = settle_contrast(dark, None)
    assert "look dark" in note and f"z = {contrast_z(dark)[0]:.1f}" in note and contrast_z(dark)[0] < DARK_Z
    np.testing.assert_array_equal(auto.stack.read(rows), particles3.stack.read(rows))
    assert auto.extra["contrast_inverted"] is True
    kept, note = settle_contrast(dark, False)
    assert note is None and kept is dark
    bright, note = settle_contrast(particles3, None)
    assert note is None and bright is particles3
    forced, note = settle_contrast(particles3, True)
    z = contrast_z(particles3)[0]
    assert z > -DARK_Z and note.startswith("--invert-contrast: the particles look bright") and f"z = {z:.1f}" in note
    assert settle_contrast(dark, True)[1] is None  # dark ones inverted as asked: nothing to say
    np.testing.assert_array_equal(forced.stack.read(rows), dark.stack.read(rows))
    assert invert_contrast(forced).extra["contrast_inverted"] is False  # twice: as read


def test_classify_dark_particles_gives_the_bright_run(sim3, dark3, tmp_path):
    """Auto: inverted, with a note, and every output as from the bright stack; --no-invert-contrast: dark classes."""
    config = tiny_config()
    bright = classify(sim3.star, tmp_path / "bright", config)
    notes = []
    auto = classify(dark3, tmp_path / "auto", config, on_note=notes.append)
    assert len(notes) == 1 and "look dark" in notes[0] and auto.contrast_note == notes[0]
    assert bright.contrast_note is None
    for name in ("classes.mrcs", "classes_unmasked.mrcs"):
        np.testing.assert_array_equal(mrcfile.read(tmp_path / "auto" / name), mrcfile.read(tmp_path / "bright" / name))
    star = {job: starfile.read(tmp_path / job / "particles.star", always_dict=True)["particles"] for job in ("auto", "bright")}
    columns = [c for c in star["bright"].columns if c != "rlnImageName"]
    pd.testing.assert_frame_equal(star["auto"][columns], star["bright"][columns])

    kept = classify(dark3, tmp_path / "kept", dataclasses.replace(config, invert_contrast=False), on_note=notes.append)
    assert len(notes) == 1 and kept.contrast_note is None
    box = kept.classes.shape[-1]
    r = np.hypot(*np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij"))
    centre = lambda classes: classes[:, r < 0.2 * box].mean(axis=1)  # noqa: E731
    assert (centre(bright.classes) > 0).all() and (centre(kept.classes)[kept.counts > 0] < 0).all()
    # --invert-contrast on the bright stack is the dark stack kept as it is.
    forced = classify(sim3.star, tmp_path / "forced", dataclasses.replace(config, invert_contrast=True))
    assert forced.contrast_note.startswith("--invert-contrast: the particles look bright")
    np.testing.assert_array_equal(forced.classes, kept.classes)
    np.testing.assert_array_equal(forced.assignments.class_index, kept.assignments.class_index)


def test_stream_settles_the_contrast_once(sim3, dark3, tmp_path):
    """A stream of dark chunks: inverted at the first update (one note), kept at the next, as the bright stream.

    A bright stream with --invert-contrast: one note, at the first update, that they looked bright.
    """
    blocks = starfile.read(sim3.star, always_dict=True)
    images = {"bright": mrcfile.read(sim3.folder / "particles.mrcs")}
    images["dark"] = -images["bright"]
    config = tiny_config(batch_size_per_class=10)  # first update at 90 particles, then every 60
    notes = {}
    images["forced"] = images["bright"]
    for kind in ("bright", "dark", "forced"):
        folder = tmp_path / kind
        folder.mkdir()

        def write(name, start, stop, kind=kind, folder=folder):
            table = blocks["particles"].iloc[start:stop].copy()
            table["rlnImageName"] = [f"{i + 1:06d}@{name}.mrcs" for i in range(stop - start)]
            write_stack(folder / f"{name}.mrcs", images[kind][start:stop], 4.0)
            write_blocks({"optics": blocks["optics"], "particles": table}, folder / f"{name}.star")

        write("c000", 0, 100)

        def add(summary, write=write):
            if summary["update"] == 1:
                write("c001", 100, 200)

        notes[kind] = []
        run_config = dataclasses.replace(config, invert_contrast=True) if kind == "forced" else config
        result = stream(folder, tmp_path / f"job-{kind}", run_config, settle_s=0.0, poll_s=0.01, until=2,
                        on_update=add, on_note=notes[kind].append)
        assert (result.updates, result.n_particles) == (2, 200)
    dark_notes = [n for n in notes["dark"] if "look dark" in n]
    assert len(dark_notes) == 1 and not [n for n in notes["bright"] if "look dark" in n]
    assert [n for n in notes["forced"] if "look" in n] == [n for n in notes["forced"] if "look bright on a dark background already" in n]
    assert len([n for n in notes["forced"] if "look" in n]) == 1
    np.testing.assert_array_equal(mrcfile.read(tmp_path / "job-dark/classes.mrcs"),
                                  mrcfile.read(tmp_path / "job-bright/classes.mrcs"))
    saved = torch.load(tmp_path / "job-dark/stream_checkpoint.pt", weights_only=False)
    assert saved["contrast_inverted"] is True
    log = [json.loads(line)["update"] for line in (tmp_path / "job-dark/updates.jsonl").read_text().splitlines()]
    assert log == [1, 2]
