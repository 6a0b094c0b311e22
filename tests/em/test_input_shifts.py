"""The input's origins (RELION's _rlnOriginX/Y[Angst]) as each particle's starting shift, as RELION's Class2D uses them."""
from dataclasses import replace

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from conftest import tiny_config

from cryo2d.classify import classify
from cryo2d.em.data import centring_factors
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import fft2c_cropped, shift_images
from cryo2d.io import read_particles


@pytest.mark.parametrize("box, work_box", [(32, 20), (33, 21), (32, 32)])
def test_centring_factors_undo_a_shift_of_the_content(box, work_box):
    """Cropped transform of an image shifted by s, times the phases of s = that of the image itself."""
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.normal(size=(3, box, box)))
    shifts = np.array([[2.0, -3.0], [0.4, 1.7], [-5.5, 0.0]])
    moved = shift_images(images, torch.from_numpy(shifts))
    along_y, along_x = centring_factors(shifts, box, work_box, "cpu")
    got = fft2c_cropped(moved.float(), work_box) * along_y[:, :, None] * along_x[:, None, :]
    want = fft2c_cropped(images.float(), work_box)
    inside = slice(1, None)  # the Nyquist row and column of an even box lose their imaginary part
    torch.testing.assert_close(got[:, inside, inside], want[:, inside, inside], atol=2e-3, rtol=1e-4)


def _with_origins(star, origins_px, version="3.1"):
    blocks = starfile.read(star, always_dict=True)
    apix = float(blocks["optics"]["rlnImagePixelSize"].iloc[0])
    table = blocks["particles"]
    if version == "3.1":
        table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origins_px[:, 0] * apix, origins_px[:, 1] * apix
    else:
        table["rlnOriginX"], table["rlnOriginY"] = origins_px[:, 0], origins_px[:, 1]
    starfile.write(blocks, star, overwrite=True)
    return blocks


def test_origins_are_read_as_shifts(sim3, tmp_path):
    """Shift = −origin, in px of each particle (Å ÷ pixel size, or px for 3.0 columns); zeros and none are None."""
    star = tmp_path / "p.star"
    star.write_text(sim3.star.read_text())
    (tmp_path / "particles.mrcs").symlink_to(sim3.star.parent / "particles.mrcs")
    assert read_particles(star).prior_shift_px is None
    origins = np.random.default_rng(0).uniform(-4, 4, size=(300, 2))
    blocks = _with_origins(star, origins)
    np.testing.assert_allclose(read_particles(star).prior_shift_px, -origins, atol=1e-5)
    _with_origins(star, np.zeros((300, 2)))
    assert read_particles(star).prior_shift_px is None
    blocks["particles"] = blocks["particles"].drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"])
    starfile.write(blocks, star, overwrite=True)
    _with_origins(star, origins, version="3.0")
    np.testing.assert_allclose(read_particles(star).prior_shift_px, -origins, atol=1e-5)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnOriginY"])
    starfile.write(blocks, star, overwrite=True)
    with pytest.raises(Cryo2DError, match=r"p.star: column _rlnOriginY missing \(_rlnOriginX is given\)"):
        read_particles(star)


def _rolled_copy(sim3, folder, roll_px):
    """sim3's images rolled by ``roll_px`` (content moves by +roll) and origins that undo it."""
    folder.mkdir()
    with mrcfile.open(sim3.star.parent / "particles.mrcs") as m:
        images, voxel = m.data.copy(), m.voxel_size
    for i, (dx, dy) in enumerate(roll_px):
        images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
    with mrcfile.new(folder / "particles.mrcs") as m:
        m.set_data(images)
        m.voxel_size = voxel
    star = folder / "particles.star"
    star.write_text(sim3.star.read_text())
    _with_origins(star, -roll_px.astype(float))
    return star


def _written_shifts(job):
    table = starfile.read(job / "particles.star", always_dict=True)["particles"]
    return table["rlnClassNumber"].to_numpy(), -np.stack([table["rlnOriginXAngst"], table["rlnOriginYAngst"]], 1)


def _agreement(a, b):
    """Fraction of particles in the class of ``b`` that holds most of their class of ``a``."""
    return sum(np.bincount(b[a == k]).max() for k in np.unique(a)) / len(a)


def test_classification_starts_from_the_input_origins(sim3, tmp_path):
    """Images rolled by up to 6 px (beyond the 3.2 px search) with origins that undo it classify as the
    originals do, and the written shifts add the roll; --no-input-shifts cannot reach the rolled particles."""
    rng = np.random.default_rng(2)
    roll = rng.integers(-6, 7, size=(300, 2))
    star = _rolled_copy(sim3, tmp_path / "rolled", roll)
    apix = float(starfile.read(star)["optics"]["rlnImagePixelSize"].iloc[0])
    cfg = tiny_config(remove_duplicates=False)
    classify(sim3.star, tmp_path / "plain", cfg)
    notes, notes_ignored = [], []
    classify(star, tmp_path / "from_origins", cfg, on_note=notes.append)
    classify(star, tmp_path / "ignored", tiny_config(remove_duplicates=False, input_shifts=False),
             on_note=notes_ignored.append)
    distance = np.hypot(*roll.T)
    assert notes == [f"each particle starts from its input origin (median {np.median(distance):.2g} px, largest "
                     f"{distance.max():.2g} px from the box centre; --no-input-shifts starts from the centre)"]
    assert notes_ignored == []
    labels, base = _written_shifts(tmp_path / "plain")
    labels_o, with_origins = _written_shifts(tmp_path / "from_origins")
    _, ignored = _written_shifts(tmp_path / "ignored")
    assert _agreement(labels_o, labels) >= 0.98  # the same partition (classes of equal size sort in any order)
    err = np.linalg.norm((with_origins - base) / apix - roll, axis=1)
    # the same shift for most; a neighbouring grid shift (1 px) where the normalisation's background moved
    assert (err < 0.01).mean() >= 0.8 and err.max() <= 1.5, ((err < 0.01).mean(), err.max())
    err_ignored = np.linalg.norm((ignored - base) / apix - roll, axis=1)
    assert np.median(err_ignored) > 1.5, np.median(err_ignored)  # the search stops 3.2 px from the centre


def test_origin_outside_the_box_is_an_error(sim3, tmp_path):
    star = tmp_path / "p.star"
    star.write_text(sim3.star.read_text())
    (tmp_path / "particles.mrcs").symlink_to(sim3.star.parent / "particles.mrcs")
    origins = np.zeros((300, 2))
    origins[4] = [0.0, 17.0]
    _with_origins(star, origins)
    with pytest.raises(Cryo2DError, match=r"p.star: particle 5's origin puts its centre 17.0 px from the box centre, "
                                          r"outside its 32 px box \(or use --no-input-shifts\)"):
        classify(star, tmp_path / "job", tiny_config())
    classify(star, tmp_path / "job", tiny_config(input_shifts=False))


def test_shift_range_of_half_the_box_is_an_error(sim3, tmp_path):
    """A search disc of radius box/2 holds shifts a whole box apart, the same pose once the image wraps
    (--shift-range 100 on a 36 px box searched 24,817 shifts)."""
    with pytest.raises(Cryo2DError, match=r"particles.star: --shift-range 16 px is half its 32 px box or more, "
                                          r"where shifts wrap around onto each other \(give less than 16\)"):
        classify(sim3.star, tmp_path / "job", tiny_config(shift_range_px=16.0))
    assert not (tmp_path / "job" / "classes.mrcs").exists()
    classify(sim3.star, tmp_path / "job", tiny_config(shift_range_px=15.5))
    assert (tmp_path / "job" / "classes.mrcs").exists()


def test_a_second_round_starts_from_the_first_rounds_shifts(sim3, tmp_path, monkeypatch):
    """Class2D, then Class2D on its particles.star (run from the folder its stack paths are relative to):
    the second round's search is centred on the first round's origins, so they stay where it put them."""
    monkeypatch.chdir(sim3.star.parent)
    cfg = tiny_config(remove_duplicates=False)
    classify(sim3.star, tmp_path / "round1", cfg)
    assert read_particles(tmp_path / "round1" / "particles.star").prior_shift_px is not None
    classify(tmp_path / "round1" / "particles.star", tmp_path / "round2", replace(cfg, seed=1))
    labels1, shifts1 = _written_shifts(tmp_path / "round1")
    labels2, shifts2 = _written_shifts(tmp_path / "round2")
    assert _agreement(labels2, labels1) >= 0.98
    apix = float(starfile.read(sim3.star)["optics"]["rlnImagePixelSize"].iloc[0])
    first = np.linalg.norm(shifts1, axis=1) / apix
    moved = np.linalg.norm(shifts2 - shifts1, axis=1) / apix
    # Origins counted twice, or with the wrong sign, would move them by their size (median 1 px) or twice it.
    assert np.median(first) >= 1.0 and np.median(moved) < 0.5, (np.median(first), np.quantile(moved, [0.5, 0.9]))
