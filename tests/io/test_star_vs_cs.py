"""The same particles via .star and via .cs give identical images and CTF (cf. cryoDRGN test_loading_csfile), the same
classes, and the same poses in each format's units."""
import numpy as np
import pytest
from particle_files import make_cs_dataset

from cryo2d.io import read_particles


def test_star_and_cs_agree(tmp_path):
    star, cs, images, _ = make_cs_dataset(tmp_path, n=10, box=12)
    from_star = read_particles(star)
    from_cs = read_particles(cs)
    everything = np.arange(10)
    np.testing.assert_array_equal(from_star.stack.read(everything), from_cs.stack.read(everything))
    np.testing.assert_array_equal(from_cs.stack.read(everything), images)
    assert from_star.box == from_cs.box == 12
    np.testing.assert_allclose(from_star.pixel_size_angst, from_cs.pixel_size_angst, rtol=1e-7)
    for field, values in from_star.ctf.__dict__.items():
        np.testing.assert_allclose(getattr(from_cs.ctf, field), values, rtol=1e-6, atol=1e-4, err_msg=field)


def test_a_star_file_and_its_cryosparc_twin_classify_alike(sim3, tmp_path, one_thread, helpers):
    """The same particles as a STAR file and as a CryoSPARC Extract job's .cs (dark images, blob/sign -1,
    float32 fields) give the same classes, and particles.cs holds the numbers of particles.star in
    CryoSPARC's units: class 0-based, pose = _rlnAnglePsi in radians, shift = origin in pixels."""
    import mrcfile
    import starfile

    from cryo2d.classify import classify

    dataset = pytest.importorskip("cryosparc.dataset")
    blocks = starfile.read(sim3.star, always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"].copy()
    n = len(parts)
    psize = np.float32(optics["rlnImagePixelSize"].iloc[0])
    with mrcfile.open(sim3.folder / "particles.mrcs") as mrc:
        images = mrc.data[[int(name.split("@")[0]) - 1 for name in parts["rlnImageName"]]].copy()
    # The CryoSPARC project: J2/extract/ holds the stack as CryoSPARC cuts it (protein dark).
    project = tmp_path / "project"
    (project / "J2" / "extract").mkdir(parents=True)
    stack = project / "J2" / "extract" / "mic_particles.mrc"
    with mrcfile.new(stack) as mrc:
        mrc.set_data(-images)
    rng = np.random.default_rng(3)
    uid = rng.integers(2**63, 2**64 - 1, n, dtype=np.uint64)  # above int64: must survive as uint64
    f32 = {name: parts[column].to_numpy(np.float32) for name, column in
           (("ctf/df1_A", "rlnDefocusU"), ("ctf/df2_A", "rlnDefocusV"))}
    angle = np.deg2rad(parts["rlnDefocusAngle"].to_numpy()).astype(np.float32)
    cs = dataset.Dataset([
        ("uid", uid),
        ("blob/path", np.full(n, "J2/extract/mic_particles.mrc", dtype=object)),
        ("blob/idx", np.arange(n, dtype=np.uint32)),
        ("blob/shape", np.full((n, 2), images.shape[-1], dtype=np.uint32)),
        ("blob/psize_A", np.full(n, psize, dtype=np.float32)),
        ("blob/sign", np.full(n, -1.0, dtype=np.float32)),
        ("ctf/type", np.full(n, "ctffind4", dtype=object)),
        ("ctf/accel_kv", np.full(n, optics["rlnVoltage"].iloc[0], dtype=np.float32)),
        ("ctf/cs_mm", np.full(n, optics["rlnSphericalAberration"].iloc[0], dtype=np.float32)),
        ("ctf/amp_contrast", np.full(n, optics["rlnAmplitudeContrast"].iloc[0], dtype=np.float32)),
        ("ctf/df1_A", f32["ctf/df1_A"]),
        ("ctf/df2_A", f32["ctf/df2_A"]),
        ("ctf/df_angle_rad", angle),
        ("ctf/phase_shift_rad", np.zeros(n, dtype=np.float32)),
        ("location/center_x_frac", rng.random(n).astype(np.float32)),
        ("pick_stats/ncc_score", rng.random(n).astype(np.float32)),
        ("alignments2D/cross_cor", rng.random(n).astype(np.float32)),  # an earlier 2D job's
    ])
    cs.save(project / "J2" / "J2_particles.cs")
    # Its STAR twin: the .cs values exactly (float32 to float64), angles back in degrees.
    optics = optics.copy()
    for column, name in (("rlnImagePixelSize", "blob/psize_A"), ("rlnVoltage", "ctf/accel_kv"),
                         ("rlnSphericalAberration", "ctf/cs_mm"), ("rlnAmplitudeContrast", "ctf/amp_contrast")):
        optics[column] = float(cs[name][0])
    parts["rlnImageName"] = [f"{i + 1:06d}@{(sim3.folder / 'particles.mrcs').resolve()}" for i in range(n)]
    parts["rlnDefocusU"] = cs["ctf/df1_A"].astype(np.float64)
    parts["rlnDefocusV"] = cs["ctf/df2_A"].astype(np.float64)
    parts["rlnDefocusAngle"] = np.rad2deg(angle.astype(np.float64))
    parts["rlnPhaseShift"] = 0.0
    star = tmp_path / "particles.star"
    starfile.write({"optics": optics, "particles": parts}, star, float_format="%.17g")

    config = helpers.tiny_config(remove_duplicates=False)
    classify(star, tmp_path / "star_job", config)
    classify(project / "J2" / "J2_particles.cs", project / "J3", config)

    with mrcfile.open(tmp_path / "star_job" / "classes.mrcs") as a, mrcfile.open(project / "J3" / "classes.mrcs") as b:
        np.testing.assert_array_equal(a.data, b.data)
    from_star = starfile.read(tmp_path / "star_job" / "particles.star", always_dict=True)["particles"]
    out = dataset.Dataset.load(project / "J3" / "particles.cs")
    np.testing.assert_array_equal(out["uid"], uid)  # the rows in the input's order
    for name in cs.fields():
        if name != "alignments2D/cross_cor":
            assert out[name].dtype == cs[name].dtype, name
            assert out[name].tolist() == cs[name].tolist(), name
    assert "alignments2D/cross_cor" not in out.fields()
    assert out["alignments2D/class"].dtype == np.uint32
    np.testing.assert_array_equal(out["alignments2D/class"], from_star["rlnClassNumber"].to_numpy() - 1)
    turn = np.rad2deg(out["alignments2D/pose"].astype(np.float64)) - from_star["rlnAnglePsi"].to_numpy()
    np.testing.assert_allclose((turn + 180.0) % 360.0 - 180.0, 0.0, atol=1e-4)
    origin = from_star[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / float(psize)
    np.testing.assert_allclose(out["alignments2D/shift"], origin, atol=1e-4)
    np.testing.assert_allclose(out["alignments2D/psize_A"], psize)
    np.testing.assert_allclose(out["alignments2D/alpha"], from_star["rlnNormCorrection"], rtol=1e-6)
    # The class averages as CryoSPARC's template group: blob/idx k is class k and image k + 1 of classes.mrcs.
    templates = dataset.Dataset.load(project / "J3" / "class_averages.cs")
    assert set(templates["blob/path"]) == {"J3/classes.mrcs"}
    counts = starfile.read(project / "J3" / "classes.star")["rlnClassParticleCount"].to_numpy()
    sizes = np.bincount(out["alignments2D/class"], minlength=len(templates))
    np.testing.assert_array_equal(sizes[templates["blob/idx"]], counts)
