"""RELION STAR: optics merge, 1-based names, units on writing, every column kept."""
import numpy as np
import pandas as pd
import pytest
import starfile
from particle_files import make_star_dataset, random_assignments, shared_data

from cryo2d.errors import Cryo2DError
from cryo2d.io import read_particles, write_particles
from cryo2d.io.mrc import MRCStack, StackRefs


def test_read_31_merges_optics_per_particle(tmp_path):
    star, images, ctf = make_star_dataset(tmp_path)
    particles = read_particles(star)
    assert isinstance(particles.stack, MRCStack) and particles.kind == "star"
    assert len(particles) == 12 and particles.box == 16
    np.testing.assert_array_equal(particles.pixel_size_angst, ctf["pixel_size_angst"])
    for field in ("defocus_u_angst", "defocus_v_angst", "defocus_angle_deg", "voltage_kv", "cs_mm",
                  "amplitude_contrast", "phase_shift_deg"):
        np.testing.assert_allclose(getattr(particles.ctf, field), ctf[field], rtol=1e-9, err_msg=field)
    np.testing.assert_array_equal(particles.ctf.bfactor_angst2, 0)
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)
    assert list(particles.extra["blocks"]) == ["optics", "particles"]


def test_a_ctf_value_in_both_blocks_is_the_particles_as_relion_reads_it(tmp_path):
    """RELION 3.1's CTF::readByGroup takes a particle row's value first; pixel sizes stay the optics group's."""
    star, _, ctf = make_star_dataset(tmp_path)
    table = starfile.read(star, always_dict=True)
    table["particles"]["rlnAmplitudeContrast"] = 0.3
    table["particles"]["rlnVoltage"] = 120.0
    table["particles"]["rlnImagePixelSize"] = 9.9
    starfile.write(table, tmp_path / "both.star")
    particles = read_particles(tmp_path / "both.star")
    assert particles.ctf.amplitude_contrast.tolist() == [0.3] * 12
    assert particles.ctf.voltage_kv.tolist() == [120.0] * 12
    np.testing.assert_array_equal(particles.pixel_size_angst, ctf["pixel_size_angst"])
    np.testing.assert_allclose(particles.ctf.cs_mm, ctf["cs_mm"], rtol=1e-9)  # only in the optics block


def test_ctf_b_factor_and_scale_columns_are_read(tmp_path):
    """_rlnCtfBfactor and _rlnCtfScalefactor (RELION's CTF envelope and amplitude factor) reach the CTF."""
    star, _, _ = make_star_dataset(tmp_path)
    assert read_particles(star).ctf.amplitude_scale.tolist() == [1.0] * 12  # absent: ones
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnCtfBfactor"] = np.linspace(-40.0, 60.0, 12)
    blocks["particles"]["rlnCtfScalefactor"] = np.linspace(0.5, 1.0, 12)
    starfile.write(blocks, star, overwrite=True)
    ctf = read_particles(star).ctf
    np.testing.assert_allclose(ctf.bfactor_angst2, np.linspace(-40.0, 60.0, 12), rtol=1e-6)
    np.testing.assert_allclose(ctf.amplitude_scale, np.linspace(0.5, 1.0, 12), rtol=1e-6)
    np.testing.assert_allclose(ctf.subset(np.array([11, 0])).amplitude_scale, [1.0, 0.5], rtol=1e-6)


def test_phase_flipped_optics_group_and_premultiplied_images(tmp_path):
    """_rlnCtfDataArePhaseFlipped per optics group reaches each particle's CTF; premultiplied images are refused."""
    from cryo2d.errors import Cryo2DError

    star, _, _ = make_star_dataset(tmp_path)  # odd rows in optics group 2
    assert read_particles(star).ctf.phase_flipped.tolist() == [0.0] * 12  # absent: not flipped
    blocks = starfile.read(star, always_dict=True)
    blocks["optics"]["rlnCtfDataArePhaseFlipped"] = [0, 1]
    starfile.write(blocks, star, overwrite=True)
    np.testing.assert_array_equal(read_particles(star).ctf.phase_flipped, np.arange(12) % 2)
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = [0, 1]
    starfile.write(blocks, star, overwrite=True)
    with pytest.raises(Cryo2DError, match=r"particles.star: _rlnCtfDataAreCtfPremultiplied is 1: .* --no-ctf"):
        read_particles(star)
    assert read_particles(star, no_ctf=True).ctf is None


def test_read_30_pixel_size_from_detector_and_magnification(tmp_path):
    star, images, ctf = make_star_dataset(tmp_path, version="3.0")
    particles = read_particles(star)
    assert particles.extra["optics"] is None and particles.extra["star_version"] == "3.0"
    np.testing.assert_allclose(particles.pixel_size_angst, 2.0)
    np.testing.assert_array_equal(particles.stack.read(np.array([5, 2])), images[[5, 2]])


def test_no_ctf_and_metadata_only(tmp_path):
    star, _, _ = make_star_dataset(tmp_path)
    particles = read_particles(star, no_ctf=True, open_stacks=False)
    assert particles.ctf is None
    assert isinstance(particles.stack, StackRefs) and particles.box == 16


def test_stack_paths_relative_to_current_folder(tmp_path, monkeypatch):
    """RELION project paths: image names relative to the project (CWD), not the STAR folder."""
    (tmp_path / "Extract").mkdir()
    star, images, _ = make_star_dataset(tmp_path / "Extract")
    table = starfile.read(star, always_dict=True)
    table["particles"]["rlnImageName"] = table["particles"]["rlnImageName"].str.replace("@", "@Extract/")
    (tmp_path / "Select").mkdir()
    starfile.write(table, tmp_path / "Select" / "particles.star")
    monkeypatch.chdir(tmp_path)
    particles = read_particles("Select/particles.star")
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)


def test_stack_paths_relative_to_the_project_dir(tmp_path, monkeypatch):
    """--project-dir: RELION's project folder, for a STAR file read from another folder; looked in first."""
    (tmp_path / "proj" / "Extract").mkdir(parents=True)
    star, images, _ = make_star_dataset(tmp_path / "proj" / "Extract")
    table = starfile.read(star, always_dict=True)
    table["particles"]["rlnImageName"] = table["particles"]["rlnImageName"].str.replace("@", "@Extract/")
    (tmp_path / "proj" / "Select").mkdir()
    starfile.write(table, tmp_path / "proj" / "Select" / "particles.star")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(Cryo2DError, match="give that folder with --project-dir"):
        read_particles("../proj/Select/particles.star")
    particles = read_particles("../proj/Select/particles.star", project_dir="../proj")
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)


def test_a_box_size_that_the_stacks_do_not_have_is_refused(tmp_path):
    """_rlnImageSize from before the stacks were rescaled: its pixel size is off too, so nothing is classified."""
    star, _, _ = make_star_dataset(tmp_path)
    table = starfile.read(star, always_dict=True)
    table["optics"]["rlnImageSize"] = 32
    starfile.write(table, tmp_path / "rescaled.star")
    assert read_particles(tmp_path / "rescaled.star", open_stacks=False).box == 32
    with pytest.raises(Cryo2DError, match=r"rescaled.star: the metadata gives 32 px images, but stack\d.mrcs has 16 px"):
        read_particles(tmp_path / "rescaled.star")


def test_stacks_found_beside_the_star_file_are_named_from_the_current_folder(tmp_path, monkeypatch):
    """Names that only work beside the STAR file are rewritten, so the rows written elsewhere still find the stacks."""
    (tmp_path / "data").mkdir()
    star, images, _ = make_star_dataset(tmp_path / "data")
    given = starfile.read(star, always_dict=True)["particles"]["rlnImageName"]
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path)
    particles = read_particles("data/particles.star")
    parts = particles.table["rlnImageName"].str.partition("@")
    assert parts[0].tolist() == given.str.partition("@")[0].tolist()  # the same image numbers
    assert parts[2].tolist() == ("data/" + given.str.partition("@")[2]).tolist()
    assert set(particles.stack.names) == {"stack0.mrcs", "stack1.mrcs"}  # as the file spells them
    write_particles(particles, tmp_path / "job" / "particles.star")  # e.g. a job's particles.star
    np.testing.assert_array_equal(read_particles("job/particles.star").stack.read(np.arange(12)), images)
    # From a folder that does not hold the stacks: their absolute paths.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    names = set(read_particles(star).table["rlnImageName"].str.partition("@")[2])
    assert names == {str(tmp_path / "data" / "stack0.mrcs"), str(tmp_path / "data" / "stack1.mrcs")}
    assert read_particles(star, open_stacks=False).table["rlnImageName"].tolist() == given.tolist()  # no stack found
    # Names the current folder finds (RELION's project paths) are kept as written.
    monkeypatch.chdir(tmp_path / "data")
    assert read_particles(star).table["rlnImageName"].tolist() == given.tolist()


def _assert_columns_equal(written: pd.DataFrame, original: pd.DataFrame, skip=()):
    for column in original.columns:
        if column in skip:
            continue
        assert column in written, column
        if pd.api.types.is_numeric_dtype(original[column]):
            np.testing.assert_array_equal(written[column].to_numpy(), original[column].to_numpy(), err_msg=column)
        else:
            assert written[column].astype(str).tolist() == original[column].astype(str).tolist(), column


def test_write_31_roundtrip_all_columns_and_units(tmp_path):
    star, _, ctf = make_star_dataset(tmp_path)
    particles = read_particles(star)
    assignments = random_assignments(len(particles))
    write_particles(particles, tmp_path / "out.star", assignments)
    written = starfile.read(tmp_path / "out.star", always_dict=True)
    assert list(written) == ["optics", "particles"]
    _assert_columns_equal(written["optics"], particles.extra["optics"])
    out = written["particles"]
    _assert_columns_equal(out, particles.table, skip={"rlnClassNumber"})
    np.testing.assert_array_equal(out["rlnClassNumber"], assignments.class_index + 1)
    # RELION sense: minus the counter-clockwise angle.
    np.testing.assert_allclose(out["rlnAnglePsi"], np.mod(-assignments.psi_deg, 360.0), rtol=1e-15)
    np.testing.assert_allclose(out["rlnOriginXAngst"], -assignments.shift_px[:, 0] * ctf["pixel_size_angst"], rtol=1e-15)
    np.testing.assert_allclose(out["rlnOriginYAngst"], -assignments.shift_px[:, 1] * ctf["pixel_size_angst"], rtol=1e-15)
    np.testing.assert_allclose(out["rlnMaxValueProbDistribution"], assignments.max_prob, rtol=1e-15)
    np.testing.assert_allclose(out["rlnNormCorrection"], assignments.scale, rtol=1e-15)
    assert "rlnOriginX" not in out and "rlnClassPosterior" not in out
    assert list(out.columns[: len(particles.table.columns)]) == list(particles.table.columns)
    again = read_particles(tmp_path / "out.star")
    np.testing.assert_array_equal(again.ctf.defocus_u_angst, particles.ctf.defocus_u_angst)
    np.testing.assert_array_equal(again.pixel_size_angst, particles.pixel_size_angst)


def test_write_30_keeps_single_block_and_pixel_origins(tmp_path):
    star, _, _ = make_star_dataset(tmp_path, version="3.0")
    particles = read_particles(star)
    assignments = random_assignments(len(particles))
    write_particles(particles, tmp_path / "out.star", assignments)
    written = starfile.read(tmp_path / "out.star", always_dict=True)
    assert list(written) == ["particles"]
    out = written["particles"]
    _assert_columns_equal(out, particles.table, skip={"rlnClassNumber"})
    np.testing.assert_allclose(out["rlnOriginX"], -assignments.shift_px[:, 0], rtol=1e-15)
    np.testing.assert_allclose(out["rlnOriginY"], -assignments.shift_px[:, 1], rtol=1e-15)
    assert "rlnOriginXAngst" not in out


@pytest.mark.parametrize("version, given, kept", [("3.0", "rlnOriginXAngst", "rlnOriginXAngst"),
                                                   ("3.1", "rlnOriginX", "rlnOriginXAngst")])
def test_origins_in_one_unit_that_read_back_as_the_new_shifts(tmp_path, version, given, kept):
    """An input's origins in the other unit (Å in a 3.0 file, pixels in a 3.1 file) do not stay beside the new ones."""
    star, _, ctf = make_star_dataset(tmp_path, version=version)
    table = starfile.read(star, always_dict=True)
    table["particles"][given] = 3.0
    table["particles"][given.replace("X", "Y")] = -1.0
    starfile.write(table, tmp_path / "old_origins.star")
    particles = read_particles(tmp_path / "old_origins.star")
    assignments = random_assignments(len(particles))
    write_particles(particles, tmp_path / "out.star", assignments)
    out = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    origins = [c for c in out.columns if c.startswith("rlnOrigin")]
    assert origins == [kept, kept.replace("X", "Y")]
    np.testing.assert_allclose(read_particles(tmp_path / "out.star").prior_shift_px, assignments.shift_px, atol=1e-9)


def test_zero_shifts_are_written_as_zero_not_minus_zero(tmp_path):
    """Centred particles get origin 0.0 (an origin is minus the shift; -0.0 reads the same but diffs and greps do not)."""
    from dataclasses import replace

    star, _, _ = make_star_dataset(tmp_path)
    particles = read_particles(star)
    assignments = random_assignments(len(particles))
    centred = replace(assignments, shift_px=np.zeros_like(assignments.shift_px))
    write_particles(particles, tmp_path / "out.star", centred)
    text = (tmp_path / "out.star").read_text()
    assert "-0.0" not in text.split()
    out = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert (out["rlnOriginXAngst"] == 0).all() and not np.signbit(out["rlnOriginXAngst"].to_numpy()).any()


def test_an_earlier_class2d_jobs_own_columns_are_not_carried_over(tmp_path):
    """A RELION Class2D data.star as input: its likelihood columns described that run's classes, so they go."""
    star, _, _ = make_star_dataset(tmp_path)
    blocks = starfile.read(star, always_dict=True)
    n = len(blocks["particles"])
    blocks["particles"]["rlnLogLikeliContribution"] = np.linspace(1e4, 2e4, n)
    blocks["particles"]["rlnNrOfSignificantSamples"] = 3
    blocks["particles"]["rlnClassNumber"] = 9
    starfile.write(blocks, star)
    particles = read_particles(star)
    assignments = random_assignments(n)
    write_particles(particles, tmp_path / "out.star", assignments)
    out = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert "rlnLogLikeliContribution" not in out and "rlnNrOfSignificantSamples" not in out
    np.testing.assert_array_equal(out["rlnClassNumber"], assignments.class_index + 1)
    write_particles(particles, tmp_path / "plain.star")  # without assignments (a selection): every column as read
    assert "rlnLogLikeliContribution" in starfile.read(tmp_path / "plain.star", always_dict=True)["particles"]


def test_write_rows_subset(tmp_path):
    star, _, ctf = make_star_dataset(tmp_path)
    particles = read_particles(star)
    assignments = random_assignments(len(particles))
    rows = np.array([9, 0, 4])
    write_particles(particles, tmp_path / "sub.star", assignments, rows=rows)
    out = starfile.read(tmp_path / "sub.star", always_dict=True)["particles"]
    assert out["rlnImageName"].tolist() == particles.table["rlnImageName"].iloc[rows].tolist()
    np.testing.assert_array_equal(out["rlnClassNumber"], assignments.class_index[rows] + 1)
    np.testing.assert_allclose(out["rlnOriginXAngst"], -assignments.shift_px[rows, 0] * ctf["pixel_size_angst"][rows])
    mask = np.zeros(len(particles), dtype=bool)
    mask[rows] = True
    write_particles(particles, tmp_path / "masked.star", rows=mask)
    masked = starfile.read(tmp_path / "masked.star", always_dict=True)["particles"]
    assert masked["rlnImageName"].tolist() == particles.table["rlnImageName"].iloc[np.sort(rows)].tolist()
    write_particles(particles, tmp_path / "plain.star", rows=rows)
    plain = starfile.read(tmp_path / "plain.star", always_dict=True)["particles"]
    _assert_columns_equal(plain, particles.table.iloc[rows])
    assert "rlnAnglePsi" not in plain


def test_real_relion31_two_optics_groups():
    particles = read_particles(shared_data("particles/aspire_sample_80S/sample_relion31.star"))
    group = particles.table["rlnOpticsGroup"].to_numpy()
    assert (group == 1).sum() == 8 and (group == 2).sum() == 9
    np.testing.assert_array_equal(particles.ctf.voltage_kv[group == 1], 300.0)
    np.testing.assert_array_equal(particles.ctf.voltage_kv[group == 2], 200.0)
    np.testing.assert_array_equal(particles.pixel_size_angst, 1.4)
    assert particles.ctf.defocus_u_angst[0] == 21186.804688
    assert particles.box == 200


def test_real_relion31_pixel_size_and_images():
    particles = read_particles(shared_data("particles/cryodrgn_relion31/relion31.star"))
    np.testing.assert_array_equal(particles.pixel_size_angst, 2.806)
    np.testing.assert_array_equal(particles.ctf.cs_mm, 0.01)
    assert particles.box == 256 and particles.stack.read(np.arange(5)).shape == (5, 256, 256)


@pytest.mark.parametrize("relative, pixel_size", [
    ("particles/aspire_sample_80S/sample_relion30.star", 5.0 * 1e4 / 37369.207031),
    ("particles/cryodrgn_sta_ribosome_bin8/sta_testing_bin8.star", 1.96),
])
def test_real_relion30(relative, pixel_size):
    particles = read_particles(shared_data(relative))
    np.testing.assert_allclose(particles.pixel_size_angst, pixel_size, rtol=1e-12)
    assert particles.extra["optics"] is None


def test_real_files_write_back_unchanged(tmp_path):
    for relative in ("particles/aspire_sample_80S/sample_relion31.star",
                     "particles/aspire_sample_80S/sample_relion30.star"):
        particles = read_particles(shared_data(relative), open_stacks=False)
        write_particles(particles, tmp_path / "copy.star")
        written = starfile.read(tmp_path / "copy.star", always_dict=True)
        assert list(written) == list(particles.extra["blocks"])
        for name, block in particles.extra["blocks"].items():
            _assert_columns_equal(written[name], block)


@pytest.mark.parametrize("extra, after", [
    ("", "loop_"),                            # a blank line after loop_
    ("# the particles", "loop_"),             # a comment line there
    ("", "_rlnDefocusU"),                     # a blank line between labels
    ("# defocus in Angstrom", "_rlnDefocusU"),  # a comment line between labels
])
def test_blank_and_comment_lines_in_a_loop_header_are_read_as_relion_reads_them(tmp_path, extra, after):
    """RELION 3.1 (relion_star_handler, relion_refine) reads these headers; starfile stopped the labels at the
    first such line and the file was refused ("not a readable STAR file (Error tokenizing data ...)")."""
    star, images, ctf = make_star_dataset(tmp_path)
    lines = []
    for line in star.read_text().splitlines():
        lines.append(line)
        if line.strip().startswith(after):
            lines.append(extra)
    edited = tmp_path / "edited.star"
    edited.write_text("\n".join(lines) + "\n")
    particles, plain = read_particles(edited), read_particles(star)
    assert list(particles.table.columns) == list(plain.table.columns)
    pd.testing.assert_frame_equal(particles.table, plain.table)
    pd.testing.assert_frame_equal(particles.extra["optics"], plain.extra["optics"])
    np.testing.assert_allclose(particles.ctf.defocus_u_angst, ctf["defocus_u_angst"], rtol=1e-9)
    np.testing.assert_array_equal(particles.pixel_size_angst, ctf["pixel_size_angst"])
    np.testing.assert_array_equal(particles.stack.read(np.arange(len(particles))), images)


def test_a_loop_header_fault_other_than_blank_lines_is_still_refused(tmp_path):
    star, _, _ = make_star_dataset(tmp_path)
    text = star.read_text().replace("_rlnDefocusU", "\n_rlnDefocusU", 1)
    (tmp_path / "bad.star").write_text(text.replace("@", " @", 1))  # a row with a column too many
    with pytest.raises(Cryo2DError, match=r"bad.star: not a readable STAR file \(Error tokenizing"):
        read_particles(tmp_path / "bad.star")


def test_nan_and_inf_in_a_passed_through_column_are_written_as_read(tmp_path):
    """A CTF fit's ``nan`` / ``inf`` (e.g. _rlnCtfMaxResolution) is written back as ``nan`` / ``inf``, not as
    starfile's ``<NA>``, which RELION does not write and other STAR readers take for text."""
    star, _, _ = make_star_dataset(tmp_path)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnCtfMaxResolution"] = [np.nan, np.inf, -np.inf] + [4.5] * 9
    starfile.write(blocks, star, overwrite=True)
    write_particles(read_particles(star), tmp_path / "out.star", random_assignments(12))
    rows = [line.split() for line in (tmp_path / "out.star").read_text().splitlines() if "@" in line]
    column = list(read_particles(star).table.columns).index("rlnCtfMaxResolution")
    assert [row[column] for row in rows[:4]] == ["nan", "inf", "-inf", "4.5"]
    back = read_particles(tmp_path / "out.star").table["rlnCtfMaxResolution"].to_numpy()
    np.testing.assert_array_equal(back[:4], [np.nan, np.inf, -np.inf, 4.5])
