"""CryoSPARC .cs: 0-based blob/idx, radians, project-relative paths, blob/sign, alignments2D on writing."""
from dataclasses import replace

import numpy as np
import pytest
from particle_files import make_cs_dataset, random_assignments, shared_data

from cryo2d.errors import Cryo2DError
from cryo2d.io import read_particles, write_particles
from cryo2d.io.mrc import StackRefs

REAL_CS = "metadata/cryosparc_P12_J24_001_particles.cs"


def test_real_cs_metadata():
    path = shared_data(REAL_CS)
    raw = np.load(path)
    particles = read_particles(path, open_stacks=False)
    assert len(particles) == 2019 and particles.kind == "cs"
    assert isinstance(particles.stack, StackRefs) and particles.box == 180
    np.testing.assert_allclose(particles.pixel_size_angst, 2.95, rtol=1e-6)
    df1 = particles.ctf.defocus_u_angst
    assert 7403 < df1.min() < 7405 and 45842 < df1.max() < 45844
    np.testing.assert_array_equal(particles.ctf.defocus_v_angst, raw["ctf/df2_A"].astype(np.float64))
    np.testing.assert_allclose(particles.ctf.defocus_angle_deg, np.degrees(raw["ctf/df_angle_rad"].astype(np.float64)))
    np.testing.assert_array_equal(particles.ctf.voltage_kv, 200.0)
    np.testing.assert_array_equal(particles.stack.sign, -1.0)  # cut from micrographs: protein dark
    assert particles.extra["cs_array"] is not None and "blob/shape[0]" in particles.table
    with pytest.raises(Cryo2DError, match=r"cryosparc_P12_J24_001_particles.cs: stack file J19/extract/.* not found"):
        read_particles(path)


def test_read_synthetic_cs_paths_and_units(tmp_path):
    _, cs, images, ctf = make_cs_dataset(tmp_path)
    particles = read_particles(cs)  # blob/path relative to the parent of J5/, some with '>'
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)
    np.testing.assert_allclose(particles.ctf.defocus_angle_deg, ctf["defocus_angle_deg"], rtol=1e-6)
    np.testing.assert_allclose(particles.ctf.phase_shift_deg, ctf["phase_shift_deg"], rtol=1e-6)
    np.testing.assert_allclose(particles.pixel_size_angst, ctf["pixel_size_angst"])
    explicit = read_particles(cs, project_dir=tmp_path)
    np.testing.assert_array_equal(explicit.stack.read(np.array([3])), images[[3]])
    with pytest.raises(Cryo2DError, match=r"J5/particles.cs: stack file stack[01].mrcs not found"):
        read_particles(cs, project_dir=tmp_path / "J5")


def test_ctf_scale_field_is_read(tmp_path):
    """ctf/scale (CryoSPARC's factor on the CTF, RELION's _rlnCtfScalefactor) reaches the CTF; absent: ones."""
    import numpy.lib.recfunctions as rfn

    _, cs, _, _ = make_cs_dataset(tmp_path)
    assert read_particles(cs).ctf.amplitude_scale.tolist() == [1.0] * 12
    with open(cs, "rb") as handle:
        array = np.load(handle)
    array = rfn.append_fields(array, "ctf/scale", np.linspace(0.6, 1.2, 12).astype(np.float32), usemask=False)
    with open(cs, "wb") as handle:
        np.save(handle, array)
    np.testing.assert_allclose(read_particles(cs).ctf.amplitude_scale, np.linspace(0.6, 1.2, 12), rtol=1e-6)


def test_blob_sign_makes_the_protein_bright(tmp_path):
    """Images are read times blob/sign (CryoSPARC: -1 for particles cut from micrographs, protein dark)."""
    from cryo2d.io import open_stack

    _, cs, images, _ = make_cs_dataset(tmp_path)
    array = np.load(cs)
    sign = np.where(np.arange(12) % 3 == 0, -1.0, 1.0).astype(np.float32)
    array["blob/sign"] = sign
    with open(cs, "wb") as handle:
        np.save(handle, array)
    everything = np.arange(12)
    particles = read_particles(cs)
    np.testing.assert_array_equal(particles.stack.read(everything), images * sign[:, None, None])
    np.testing.assert_array_equal(particles.stack.read(np.array([9, 3])), -images[[9, 3]])  # any order
    lazy = read_particles(cs, open_stacks=False)
    np.testing.assert_array_equal(lazy.stack.sign, sign)
    np.testing.assert_array_equal(open_stack(lazy).stack.read(everything), images * sign[:, None, None])
    # Inverting on top: every image's contrast flips again, the file's sign included.
    np.testing.assert_array_equal(particles.stack.inverted().read(everything), -images * sign[:, None, None])
    np.testing.assert_array_equal(open_stack(replace(lazy, stack=lazy.stack.inverted())).stack.read(everything),
                                  -images * sign[:, None, None])
    np.testing.assert_array_equal(particles.stack.read(everything), images * sign[:, None, None])  # unchanged
    array["blob/sign"][4] = 0.5
    with open(cs, "wb") as handle:
        np.save(handle, array)
    with pytest.raises(Cryo2DError, match=r"particles.cs: blob/sign 0.5 of particle 5 is not 1 or -1"):
        read_particles(cs)


def test_write_cs_roundtrip_all_fields_and_units(tmp_path):
    _, cs, _, ctf = make_cs_dataset(tmp_path)
    particles = read_particles(cs)
    assignments = random_assignments(len(particles))
    write_particles(particles, tmp_path / "out.cs", assignments)
    assert (tmp_path / "out.cs").is_file()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".npy", ".tmp")]
    raw = np.load(cs)
    out = np.load(tmp_path / "out.cs")
    for name in raw.dtype.names:
        np.testing.assert_array_equal(out[name], raw[name], err_msg=name)
    assert out["alignments2D/class"].dtype == np.uint32
    np.testing.assert_array_equal(out["alignments2D/class"], assignments.class_index)
    # RELION sense: minus the counter-clockwise angle.
    np.testing.assert_allclose(out["alignments2D/pose"], np.radians(np.mod(-assignments.psi_deg, 360.0)), rtol=1e-6)
    np.testing.assert_allclose(out["alignments2D/shift"], -assignments.shift_px, rtol=1e-6)
    np.testing.assert_allclose(out["alignments2D/psize_A"], ctf["pixel_size_angst"], rtol=1e-6)
    np.testing.assert_allclose(out["alignments2D/class_posterior"], assignments.class_posterior, rtol=1e-6)
    np.testing.assert_allclose(out["alignments2D/class_ess"], assignments.class_ess, rtol=1e-6)
    np.testing.assert_allclose(out["alignments2D/alpha"], assignments.scale, rtol=1e-6)
    # Writing a classified file again replaces the alignments2D fields, it does not duplicate them.
    again = read_particles(tmp_path / "out.cs", project_dir=tmp_path)
    write_particles(again, tmp_path / "twice.cs", random_assignments(len(again), seed=5))
    assert np.load(tmp_path / "twice.cs").dtype.names == out.dtype.names


def test_write_cs_rows_subset(tmp_path):
    _, cs, _, _ = make_cs_dataset(tmp_path)
    particles = read_particles(cs)
    assignments = random_assignments(len(particles))
    rows = np.array([11, 2, 5])
    write_particles(particles, tmp_path / "sub.cs", assignments, rows=rows)
    out = np.load(tmp_path / "sub.cs")
    np.testing.assert_array_equal(out["uid"], np.load(cs)["uid"][rows])
    np.testing.assert_array_equal(out["alignments2D/class"], assignments.class_index[rows])
    write_particles(particles, tmp_path / "plain.cs", rows=rows)
    assert np.load(tmp_path / "plain.cs").dtype == np.load(cs).dtype
