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


def test_damaged_checkpoint_is_a_user_error(particles3, interrupted, tmp_path):
    config, _, _ = interrupted
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Cryo2DError, match="bad.pt"):
        run_em(particles3, config, checkpoint=bad, resume=True)
