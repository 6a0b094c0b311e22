"""``concat_particles``: several particle files (a stream's pieces) as one set."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile
from particle_files import make_cs_dataset, make_star_dataset, write_mrcs

from cryo2d.errors import Cryo2DError
from cryo2d.io import read_particles, write_particles
from cryo2d.io.concat import concat_particles


def _split_star(star, rows_a, rows_b):
    blocks = starfile.read(star, always_dict=True)
    paths = []
    for name, rows in (("a.star", rows_a), ("b.star", rows_b)):
        part = {"optics": blocks["optics"], "particles": blocks["particles"].iloc[rows]}
        starfile.write(part, star.parent / name)
        paths.append(star.parent / name)
    return paths


def test_input_origins_are_joined_in_order(tmp_path):
    """A file whose origins are all zero joins as zero shifts; no origins anywhere stays None."""
    star, _, _ = make_star_dataset(tmp_path, n=12)
    blocks = starfile.read(star, always_dict=True)
    origin_px = np.where(np.arange(12) < 5, np.arange(12) - 2.5, 0.0)  # rows 5-11: zero
    pixel = np.where(np.arange(12) % 2 == 0, 1.5, 2.0)  # optics groups 1 and 2
    blocks["particles"]["rlnOriginXAngst"] = origin_px * pixel
    blocks["particles"]["rlnOriginYAngst"] = -2 * origin_px * pixel
    starfile.write(blocks, star, overwrite=True)
    a, b = _split_star(star, slice(0, 5), slice(5, 12))
    assert read_particles(b).prior_shift_px is None
    joined = concat_particles([read_particles(a), read_particles(b)], tmp_path)
    np.testing.assert_allclose(joined.prior_shift_px, -np.stack([origin_px, -2 * origin_px], axis=1), atol=1e-9)
    assert concat_particles([read_particles(b), read_particles(b)], tmp_path).prior_shift_px is None


def test_two_star_files_equal_the_whole(tmp_path):
    star, images, ctf = make_star_dataset(tmp_path, n=12)
    a, b = _split_star(star, slice(0, 5), slice(5, 12))
    joined = concat_particles([read_particles(a), read_particles(b)], tmp_path)
    whole = read_particles(star)
    assert len(joined) == 12 and joined.box == whole.box
    np.testing.assert_array_equal(joined.stack.read(np.arange(12)), images)
    np.testing.assert_array_equal(joined.stack.read(np.array([11, 0, 6])), images[[11, 0, 6]])
    for field in ctf:
        if field != "pixel_size_angst":
            np.testing.assert_allclose(getattr(joined.ctf, field), getattr(whole.ctf, field))
    np.testing.assert_allclose(joined.pixel_size_angst, whole.pixel_size_angst)
    write_particles(joined, tmp_path / "out.star")
    back = starfile.read(tmp_path / "out.star", always_dict=True)
    assert list(back["optics"]["rlnOpticsGroup"]) == [1, 2]
    assert list(back["particles"]["rlnImageName"]) == list(whole.table["rlnImageName"])


def test_mismatches_name_the_file(tmp_path):
    star, _, _ = make_star_dataset(tmp_path, n=12)
    a, b = _split_star(star, slice(0, 6), slice(6, 12))
    blocks = starfile.read(b, always_dict=True)
    blocks["optics"].loc[1, "rlnVoltage"] = 120.0
    starfile.write(blocks, tmp_path / "c.star")
    with pytest.raises(Cryo2DError, match=r"c.star: optics group 2 differs from the one in .*a.star"):
        concat_particles([read_particles(a), read_particles(tmp_path / "c.star")], tmp_path)
    write_mrcs(tmp_path / "big.mrcs", np.zeros((12, 20, 20)))
    blocks = starfile.read(b, always_dict=True)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@big.mrcs" for i in range(6)]
    blocks["optics"]["rlnImageSize"] = 20
    starfile.write(blocks, tmp_path / "d.star")
    with pytest.raises(Cryo2DError, match=r"d.star: mixed box sizes: 20 px images, .*a.star has 16 px"):
        concat_particles([read_particles(a), read_particles(tmp_path / "d.star")], tmp_path)


def test_two_cs_files(tmp_path):
    _, cs, images, _ = make_cs_dataset(tmp_path, n=12)
    array = np.load(cs)
    for name, rows in (("a.cs", slice(0, 4)), ("b.cs", slice(4, 12))):
        with open(cs.parent / name, "wb") as handle:
            np.save(handle, array[rows])
    joined = concat_particles([read_particles(cs.parent / "a.cs"), read_particles(cs.parent / "b.cs")], cs.parent)
    assert joined.kind == "cs"
    np.testing.assert_array_equal(joined.extra["cs_array"], array)
    np.testing.assert_array_equal(joined.stack.read(np.arange(12)), images)
    write_particles(joined, tmp_path / "out.cs")
    np.testing.assert_array_equal(np.load(tmp_path / "out.cs")["uid"], array["uid"])


def test_cs_files_whose_strings_differ_in_width_are_joined(tmp_path):
    """Two Extract jobs' .cs files: numpy stores blob/path as wide as each file's longest path
    (J9/... in S66, J150/... in S67). They are one set; a field of another type is still refused
    (numpy would turn its numbers into strings)."""
    _, cs, images, _ = make_cs_dataset(tmp_path, n=12)
    array = np.load(cs)
    width = array.dtype["blob/path"].itemsize
    wide = np.dtype([(name, f"S{width + 1}" if name == "blob/path" else array.dtype[name]) for name in array.dtype.names])
    with open(tmp_path / "a.cs", "wb") as handle:
        np.save(handle, array[:4])
    with open(tmp_path / "b.cs", "wb") as handle:
        np.save(handle, array[4:].astype(wide))
    joined = concat_particles([read_particles(tmp_path / "a.cs"), read_particles(tmp_path / "b.cs")], tmp_path)
    assert joined.extra["cs_array"].dtype["blob/path"].itemsize == width + 1
    assert joined.extra["cs_array"]["blob/path"].tolist() == array["blob/path"].tolist()
    np.testing.assert_array_equal(joined.extra["cs_array"]["uid"], array["uid"])
    np.testing.assert_array_equal(joined.stack.read(np.arange(12)), images)
    text = np.dtype([(name, "S8" if name == "ctf/exp_group_id" else array.dtype[name]) for name in array.dtype.names])
    with open(tmp_path / "c.cs", "wb") as handle:
        np.save(handle, array[4:].astype(wide).astype(text))
    with pytest.raises(Cryo2DError, match=r"c.cs: .cs fields differ from those of .*a.cs"):
        concat_particles([read_particles(tmp_path / "a.cs"), read_particles(tmp_path / "c.cs")], tmp_path)


_MANY_FILES = r"""
import resource, sys
import numpy as np, pandas as pd, starfile
from particle_files import write_mrcs
folder, n = sys.argv[1], int(sys.argv[2])
optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                       "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [2.0]})
for i in range(n):
    write_mrcs(f"{folder}/m{i}.mrcs", np.full((2, 8, 8), i, dtype=np.float32))
    table = pd.DataFrame({"rlnImageName": [f"1@m{i}.mrcs", f"2@m{i}.mrcs"], "rlnDefocusU": 1e4,
                          "rlnDefocusV": 1e4, "rlnDefocusAngle": 0.0})
    starfile.write({"optics": optics, "particles": table}, f"{folder}/m{i}.star")
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from cryo2d.io import read_particles
from cryo2d.io.concat import concat_particles
joined = concat_particles([read_particles(f"{folder}/m{i}.star") for i in range(n)], folder)
for _ in range(2):
    images = joined.stack.read(np.arange(len(joined)))
print(",".join(str(int(v)) for v in images[::2, 0, 0]))
"""


def test_a_stream_of_many_files_stays_within_the_open_file_limit(tmp_path):
    """A set joined from more per-micrograph files than the process may hold open reads every image
    (each file's stack once stayed open: 1,100 of them passed Linux's default limit of 1,024)."""
    resource = pytest.importorskip("resource")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 200:
        pytest.skip("the test lowers the open-file limit to 96 and needs more to start from")
    n = 120
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _MANY_FILES, str(tmp_path), str(n)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ",".join(str(i) for i in range(n))
