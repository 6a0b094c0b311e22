"""Checkpoints: a resumed run equals an uninterrupted one; foreign checkpoints are refused."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from cryo2d.em.engine import run_em
from cryo2d.errors import Cryo2DError

FIELDS = ("classes", "counts", "class_index", "psi_deg", "shift_px", "max_prob", "class_posterior", "scale")


@pytest.fixture(scope="module")
def interrupted(particles3, helpers, tmp_path_factory):
    """An uninterrupted run with checkpoints, and a copy of the checkpoint written after iteration 2."""
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt, saved = folder / "checkpoint.pt", folder / "after2.pt"

    def on_iteration(record):
        if record["iteration"] == 2:
            shutil.copy(ckpt, saved)

    config = helpers.tiny_config(n_online_iterations=4)
    full = run_em(particles3, config, checkpoint=ckpt, on_iteration=on_iteration)
    return config, full, saved


def test_resumed_run_equals_uninterrupted_run(particles3, interrupted):
    config, full, saved = interrupted
    assert saved.exists()
    seen = []
    resumed = run_em(particles3, config, checkpoint=saved, resume=True, on_iteration=seen.append)
    assert [r["iteration"] for r in seen] == [1, 2, 3, 4, 5]  # the checkpoint's records replayed, then 3-5
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4, 5]


def test_resume_without_checkpoint_starts_afresh(particles3, interrupted, tmp_path):
    config, full, _ = interrupted
    fresh = run_em(particles3, config, checkpoint=tmp_path / "none.pt", resume=True)
    np.testing.assert_array_equal(fresh.class_index, full.class_index)
    assert (tmp_path / "none.pt").exists()


def test_checkpoint_from_other_settings_is_refused(particles3, helpers, interrupted, tmp_path):
    _, _, saved = interrupted
    ckpt = tmp_path / "c.pt"
    shutil.copy(saved, ckpt)
    with pytest.raises(Cryo2DError, match="other settings"):
        run_em(particles3, helpers.tiny_config(n_online_iterations=4, n_classes=4), checkpoint=ckpt, resume=True)
    with pytest.raises(Cryo2DError, match="other settings"):
        run_em(particles3, helpers.tiny_config(n_online_iterations=4, seed=1), checkpoint=ckpt, resume=True)


def test_checkpoint_from_other_settings_names_the_options(particles3, helpers, interrupted, tmp_path):
    """The error names each differing setting by its option (not its EMConfig field), with both values."""
    import re

    config, _, saved = interrupted
    ckpt = tmp_path / "c.pt"
    shutil.copy(saved, ckpt)
    other = helpers.tiny_config(n_online_iterations=4, n_full_iterations=config.n_full_iterations + 2,
                                psi_step_deg=5.0, sort_classes=not config.sort_classes)
    with pytest.raises(Cryo2DError) as err:
        run_em(particles3, other, checkpoint=ckpt, resume=True)
    message = str(err.value)
    inside = re.search(r"other settings \((.*)\);", message).group(1).split("; ")
    assert inside == [f"--full-iterations {config.n_full_iterations} there, {config.n_full_iterations + 2} now",
                      "--psi-step default there, 5 now", "--no-sort"], message
    assert message.startswith(f"{ckpt}: ") and "\n" not in message


def test_checkpoint_from_other_data_is_refused(sim3, helpers, interrupted, tmp_path):
    config, _, saved = interrupted
    fewer = helpers.memory_particles(sim3.sim.images[:200], sim3.sim.pixel_size_angst, ctf=sim3.sim.ctf.subset(np.arange(200)))
    with pytest.raises(Cryo2DError, match="different dataset"):
        run_em(fewer, config, checkpoint=saved, resume=True)


def test_checkpoint_from_other_particles_of_the_same_count_is_refused(sim3, particles3, helpers, interrupted, tmp_path):
    """Another set of as many particles (another simulation, another extraction): their images or defocus differ."""
    import dataclasses

    import starfile

    from cryo2d.io import read_particles
    from cryo2d.io.star import write_blocks

    config, _, saved = interrupted
    ctf = dataclasses.replace(particles3.ctf, defocus_u_angst=particles3.ctf.defocus_u_angst + 100.0)
    with pytest.raises(Cryo2DError, match="different dataset"):
        run_em(dataclasses.replace(particles3, ctf=ctf), config, checkpoint=saved, resume=True)
    blocks = starfile.read(sim3.star, always_dict=True)  # the same rows in another order
    blocks["particles"] = blocks["particles"].iloc[::-1].reset_index(drop=True)
    blocks["particles"]["rlnImageName"] = [f"{n.split('@')[0]}@{sim3.folder / n.split('@')[1]}"
                                           for n in blocks["particles"]["rlnImageName"]]
    write_blocks(blocks, tmp_path / "reversed.star")  # every value exactly as read
    with pytest.raises(Cryo2DError, match="different dataset"):
        run_em(read_particles(tmp_path / "reversed.star"), config, checkpoint=saved, resume=True)
    # The same particles from a STAR file in another folder (stacks named by their full path): resumed.
    blocks["particles"] = blocks["particles"].iloc[::-1].reset_index(drop=True)
    write_blocks(blocks, tmp_path / "same.star")
    run_em(read_particles(tmp_path / "same.star"), config, checkpoint=saved, resume=True)


def test_checkpoint_of_the_same_images_from_other_origins_is_refused(particles3, helpers, tmp_path):
    """The same images and CTF with other input origins (an earlier Class2D's particles.star): the
    checkpoint's shifts are from its own origins, so a resume would write every origin off by the
    difference; refused. Without input shifts the origins are not used, and it resumes."""
    import dataclasses

    config = helpers.tiny_config(n_online_iterations=2)
    ckpt = tmp_path / "c.pt"
    run_em(particles3, config, checkpoint=ckpt)  # the set has no origins
    prior = np.tile(np.float64([2.0, -1.0]), (len(particles3), 1))
    moved = dataclasses.replace(particles3, prior_shift_px=prior)
    with pytest.raises(Cryo2DError, match="different dataset"):
        run_em(moved, config, checkpoint=ckpt, resume=True)
    run_em(moved, dataclasses.replace(config, input_shifts=False), checkpoint=tmp_path / "off.pt")
    shutil.copy(tmp_path / "off.pt", tmp_path / "off2.pt")
    resumed = run_em(particles3, dataclasses.replace(config, input_shifts=False), checkpoint=tmp_path / "off2.pt",
                     resume=True)
    assert np.abs(resumed.shift_px).max() < 3  # its own search's shifts, no origin added
    ckpt2 = tmp_path / "c2.pt"
    first = run_em(moved, config, checkpoint=ckpt2)
    again = run_em(moved, config, checkpoint=ckpt2, resume=True)  # the same origins: resumed
    np.testing.assert_array_equal(again.shift_px, first.shift_px)
    with pytest.raises(Cryo2DError, match="different dataset"):
        run_em(particles3, config, checkpoint=ckpt2, resume=True)


def test_checkpoint_of_other_images_left_by_skip_bad_is_refused(particles3, helpers, tmp_path):
    """--skip-bad classifies a subset of the stack's images: which images they are still tells one
    set from another (here other images with the first set's CTF), and the same subset resumes."""
    import dataclasses

    from cryo2d.classify import subset_particles

    config = helpers.tiny_config(n_online_iterations=2)
    n = len(particles3)
    kept = subset_particles(particles3, np.arange(1, n))  # image 1 dropped as bad
    others = dataclasses.replace(subset_particles(particles3, np.arange(0, n - 1)), ctf=kept.ctf)
    ckpt = tmp_path / "c.pt"
    first = run_em(kept, config, checkpoint=ckpt)
    with pytest.raises(Cryo2DError, match="different dataset"):
        run_em(others, config, checkpoint=ckpt, resume=True)
    again = run_em(subset_particles(particles3, np.arange(1, n)), config, checkpoint=ckpt, resume=True)
    np.testing.assert_array_equal(again.class_index, first.class_index)


def test_damaged_checkpoint_is_a_user_error(particles3, interrupted, tmp_path):
    config, _, _ = interrupted
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Cryo2DError, match="bad.pt"):
        run_em(particles3, config, checkpoint=bad, resume=True)
