"""CryoSPARC .cs: 0-based blob/idx, radians, project-relative paths, blob/sign, alignments2D on writing."""
import json
import os
from dataclasses import replace

import numpy as np
import pytest
from particle_files import make_cs_dataset, random_assignments, shared_data

from cryo2d.errors import Cryo2DError
from cryo2d.io import read_particles, write_particles
from cryo2d.io.mrc import StackRefs
from cryo2d.io.watch import ParticleWatcher

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


def test_an_earlier_2d_jobs_alignments_are_replaced_whole(tmp_path):
    """CryoSPARC's own 2D fields (error, cross_cor, ...) of the input do not survive next to ours."""
    import numpy.lib.recfunctions as rfn

    _, cs, _, _ = make_cs_dataset(tmp_path)
    array = np.load(cs)
    array = rfn.append_fields(array, ["alignments2D/cross_cor", "alignments2D/class"], [np.ones(len(array)),
                              np.full(len(array), 7, dtype=np.uint32)], usemask=False)
    with open(cs, "wb") as handle:
        np.save(handle, array)
    assignments = random_assignments(len(array))
    write_particles(read_particles(cs), tmp_path / "out.cs", assignments)
    out = np.load(tmp_path / "out.cs")
    assert "alignments2D/cross_cor" not in out.dtype.names and "alignments3D/pose" in out.dtype.names
    np.testing.assert_array_equal(out["alignments2D/class"], assignments.class_index)


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


def test_compressed_cs_files_read_through_cryosparc_tools(tmp_path, monkeypatch):
    """cryosparc-tools' CSDAT format (not numpy's): the same particles; without the package, one line that says so."""
    import sys

    dataset_module = pytest.importorskip("cryosparc.dataset")
    _, cs, images, _ = make_cs_dataset(tmp_path)
    packed = tmp_path / "J5" / "packed.cs"
    dataset_module.Dataset.load(cs).save(packed, format=dataset_module.CSDAT_FORMAT)
    assert packed.read_bytes()[:6] == b"\x95CSDAT"
    plain, read = np.load(cs), read_particles(packed).extra["cs_array"]
    assert type(read) is np.ndarray and read.dtype.names == plain.dtype.names
    for name in plain.dtype.names:
        np.testing.assert_array_equal(read[name], plain[name], err_msg=name)
    np.testing.assert_array_equal(read_particles(packed).stack.read(np.arange(len(plain))), images)
    monkeypatch.setitem(sys.modules, "cryosparc.dataset", None)  # as if cryosparc-tools were not installed
    with pytest.raises(Cryo2DError, match=r"packed.cs: a .cs file in cryosparc-tools' compressed format .*pip install"):
        read_particles(packed)


def _split_passthrough(cs, main_name: str, fields_prefixes=("ctf/", "location/")):
    """Rewrite ``cs`` as CryoSPARC's two files: the job's own fields, and a passthrough file of the rest.

    The passthrough file holds its rows in reverse order plus 3 particles of
    other uids, and pick locations; returns (main path, passthrough path,
    the original array, the locations).
    """
    import numpy.lib.recfunctions as rfn

    array = np.load(cs)
    n = len(array)
    rng = np.random.default_rng(1)
    centres = rng.uniform(0.1, 0.9, (n, 2)).astype(np.float32)
    main_fields = [f for f in array.dtype.names if not f.startswith(fields_prefixes)]
    main = rfn.repack_fields(array[main_fields])
    main["blob/psize_A"] = main["blob/psize_A"].min()  # one pixel size, for a classify run
    through = rfn.repack_fields(array[["uid"] + [f for f in array.dtype.names if f.startswith(fields_prefixes)]])
    through = rfn.append_fields(through, ["location/center_x_frac", "location/center_y_frac"],
                                [centres[:, 0], centres[:, 1]], usemask=False)
    others = through[:3].copy()
    others["uid"] = 7 + np.arange(3)
    through = np.concatenate([through[::-1], others])
    folder = cs.parent
    cs.unlink()
    paths = folder / main_name, folder / "J5_passthrough_particles.cs"
    for path, data in zip(paths, (main, through)):
        with open(path, "wb") as handle:
            np.save(handle, data)
    return *paths, array, centres


def test_passthrough_file_adds_the_ctf_and_locations(tmp_path, capsys):
    """A CryoSPARC job's particles file without CTF reads it from the passthrough file beside it, by uid."""
    from cryo2d.cli.main import main as cli

    _, cs, images, ctf = make_cs_dataset(tmp_path)
    main, through, array, centres = _split_passthrough(cs, "J5_020_particles.cs")
    # A passthrough file of other particles (a Select 2D's excluded ones) with other values: passed over.
    decoy = np.load(through)[-3:].copy()
    decoy["ctf/df1_A"] = -1.0
    with open(main.parent / "J5_passthrough_particles_excluded.cs", "wb") as handle:
        np.save(handle, decoy)
    particles = read_particles(main)
    assert [(p.name, sorted(f)) for p, f in particles.extra["passthrough"]] == [(through.name, sorted(
        [f for f in array.dtype.names if f.startswith("ctf/")] + ["location/center_x_frac", "location/center_y_frac"]))]
    np.testing.assert_allclose(particles.ctf.defocus_u_angst, ctf["defocus_u_angst"], rtol=1e-6)
    np.testing.assert_allclose(particles.ctf.defocus_angle_deg, ctf["defocus_angle_deg"], rtol=1e-6)
    np.testing.assert_array_equal(particles.table["location/center_x_frac"], centres[:, 0])
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)
    assert particles.extra["cs_array"]["uid"].tolist() == array["uid"].tolist()
    # The job's particles.cs carries the merged fields; the note names the passthrough file.
    job = tmp_path / "job"
    assert cli(["classify", str(main), "-o", str(job), "--classes", "2", "--online-iterations", "1",
                "--batch-per-class", "6", "--seed", "0"]) == 0
    assert f"read ctf/*, location/* from {through.name} (CryoSPARC's passthrough fields" in capsys.readouterr().err
    out = np.load(job / "particles.cs")
    for name in array.dtype.names:
        if name != "blob/psize_A":
            np.testing.assert_array_equal(out[name], array[name], err_msg=name)
    assert cli(["info", str(main), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passthrough"] == [through.name]
    # A stream watching the folder reads the particle file only (with its passthrough fields).
    assert ParticleWatcher(main.parent, settle_s=0.0).names() == [main.name]
    # ... and only once the passthrough files have settled too.
    now = [0.0]
    watcher = ParticleWatcher(main.parent, settle_s=1.0, clock=lambda: now[0])
    watcher.poll()
    now[0] = 0.5
    os.utime(through, ns=(10**18, 10**18))  # the passthrough file written again
    watcher.poll()
    now[0] = 1.2  # the particle file has been still for 1.2 s, the passthrough file for 0.7 s
    watcher.poll()
    assert watcher.sets == {}
    now[0] = 1.6  # both still for 1 s: the stacks, written before the particle file, are read with it
    notes, _ = watcher.poll()
    assert list(watcher.sets) == [main.name] and watcher.sets[main.name].ctf is not None
    assert notes == [f"{main.name}: read ctf/*, location/* from {through.name} (CryoSPARC's passthrough fields, matched by uid)"]
    # Without the passthrough file: one error that says where the CTF is kept.
    through.rename(tmp_path / through.name)
    with pytest.raises(Cryo2DError, match=r"J5_020_particles.cs: field ctf/df1_A missing, and no CryoSPARC passthrough file"):
        read_particles(main)
    assert read_particles(main, no_ctf=True).extra["passthrough"] == []
    # The passthrough file given as the particle file: named as such.
    with pytest.raises(Cryo2DError, match=r"blob/path missing \(no particle images\) \(a CryoSPARC passthrough file"):
        read_particles(tmp_path / through.name)


def test_a_complete_file_reads_no_passthrough(tmp_path):
    """A .cs file with CTF and locations of its own is read alone, whatever lies beside it."""
    import numpy.lib.recfunctions as rfn

    _, cs, _, ctf = make_cs_dataset(tmp_path)
    array = np.load(cs)
    array = rfn.append_fields(array, "location/center_x_frac", np.full(12, 0.5, np.float32), usemask=False)
    with open(cs, "wb") as handle:
        np.save(handle, array)
    bogus = array[["uid", "ctf/df1_A"]].copy()
    bogus["ctf/df1_A"] = -1.0
    with open(cs.parent / "J5_passthrough_particles.cs", "wb") as handle:
        np.save(handle, rfn.repack_fields(bogus))
    particles = read_particles(cs)
    assert particles.extra["passthrough"] == []
    np.testing.assert_allclose(particles.ctf.defocus_u_angst, ctf["defocus_u_angst"], rtol=1e-6)
