"""The written in-plane poses align particles in RELION's sense.

RELION aligns a particle to its reference by translating it by the origin
(``_rlnOriginX/YAngst``) and then rotating it by ``_rlnAnglePsi``; this is
what ``relion_stack_create --apply_transformation`` does and what its
re-centred extraction assumes (the particle sits at the coordinate minus the
origin). Particles made here by our forward model, particle =
shift(rotate(reference, psi), t), must come back to the reference.
"""
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryo2d.fourier import rotate_images, shift_images
from cryo2d.io import read_particles, write_particles
from cryo2d.particles import Assignments

BOX = 48
PIXEL = 2.0


def _reference() -> np.ndarray:
    """An asymmetric test image: two blobs of different size and height and a bar (no symmetry)."""
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    image = np.exp(-((x + 7) ** 2 + (y + 4) ** 2) / 18.0) + 0.6 * np.exp(-((x - 6) ** 2 + (y - 3) ** 2) / 8.0)
    image += 0.8 * np.exp(-((x - 1) ** 2) / 4.0 - ((y - 9) ** 2) / 30.0)
    return image.astype(np.float32)


def _particle_job(tmp_path, n: int = 12, seed: int = 0):
    """Particles of ``_reference`` at known poses, their STAR file, and our classification of them written back."""
    rng = np.random.default_rng(seed)
    psi = rng.uniform(0.0, 360.0, n)
    shift = rng.uniform(-5.0, 5.0, (n, 2))
    ref = torch.from_numpy(np.repeat(_reference()[None], n, axis=0))
    images = shift_images(rotate_images(ref, torch.from_numpy(psi)), torch.from_numpy(shift)).numpy()
    with mrcfile.new(tmp_path / "particles.mrcs") as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.voxel_size = PIXEL
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [PIXEL], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    table = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
                          "rlnDefocusU": 20000.0, "rlnDefocusV": 20000.0, "rlnDefocusAngle": 0.0, "rlnOpticsGroup": 1})
    starfile.write({"optics": optics, "particles": table}, tmp_path / "particles.star")
    ones = np.ones(n)
    assignments = Assignments(class_index=np.zeros(n, dtype=np.int64), psi_deg=psi, shift_px=shift, max_prob=ones,
                              class_posterior=ones, class_ess=ones, scale=ones, keep=np.ones(n, dtype=bool))
    out = tmp_path / "job.star"
    write_particles(read_particles(tmp_path / "particles.star"), out, assignments)
    return out, images


def _relion_align(images: np.ndarray, psi_deg: np.ndarray, origin_px: np.ndarray) -> np.ndarray:
    """RELION's alignment of particles: translate by the origin, then rotate by psi (checked against RELION below)."""
    moved = shift_images(torch.tensor(images), torch.tensor(origin_px))
    return rotate_images(moved, torch.tensor(psi_deg)).numpy()


def _ncc_to_reference(aligned: np.ndarray) -> np.ndarray:
    """Pearson correlation of each aligned image with the reference inside the central disc (radius 0.4 box)."""
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    inside = np.hypot(x, y) <= 0.4 * BOX
    ref = _reference()[inside]
    return np.array([np.corrcoef(a[inside], ref)[0, 1] for a in aligned])


def _written_poses(star) -> tuple[np.ndarray, np.ndarray]:
    table = starfile.read(star, always_dict=True)["particles"]
    origin = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIXEL
    return table["rlnAnglePsi"].to_numpy(), origin


def test_written_psi_and_origin_align_particles_to_their_class(tmp_path):
    star, images = _particle_job(tmp_path)
    psi, origin = _written_poses(star)
    assert _ncc_to_reference(_relion_align(images, psi, origin)).min() > 0.99
    # The opposite signs do not: each of the two conventions is needed.
    assert np.median(_ncc_to_reference(_relion_align(images, psi, -origin))) < 0.9
    assert np.median(_ncc_to_reference(_relion_align(images, -psi, origin))) < 0.9


def test_relion_stack_create_aligns_particles_with_the_written_poses(tmp_path):
    """RELION 3.1's own --apply_transformation on our particles.star gives the class's frame back."""
    tool = shutil.which("relion_stack_create")
    if tool is None:
        pytest.skip("RELION (relion_stack_create) not installed")
    star, images = _particle_job(tmp_path)
    subprocess.run([tool, "--i", star.name, "--o", "aligned", "--apply_transformation"], check=True,
                   capture_output=True, cwd=tmp_path)
    with mrcfile.open(tmp_path / "aligned.mrcs") as mrc:
        aligned = np.array(mrc.data, dtype=np.float32)
    assert _ncc_to_reference(aligned).min() > 0.99
    psi, origin = _written_poses(star)
    model = _relion_align(images, psi, origin)
    assert min(np.corrcoef(a.ravel(), m.ravel())[0, 1] for a, m in zip(aligned, model)) > 0.99
