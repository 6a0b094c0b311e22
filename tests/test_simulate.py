"""Simulator: projections, ground truth, SNR, reproducibility, files."""
from __future__ import annotations

import hashlib
import json

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryo2d.ctf import ctf_grid
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import fft2c, ifft2c, radius_grid, rotate_images, shift_images
from cryo2d.simulate import (
    _SliceProjector,
    _prepare_volume,
    bundled_map_path,
    dark_map_note,
    euler_to_matrix,
    project,
    read_map,
    simulate,
    write_simulation,
)

BOX = 32


@pytest.fixture(scope="module")
def bundled():
    return read_map("bundled")


@pytest.fixture(scope="module")
def small_volume(bundled):
    vol, pixel = _prepare_volume(*bundled, BOX, None)
    return vol, pixel


def test_bundled_map(bundled):
    vol, voxel = bundled
    assert bundled_map_path().is_file()
    assert vol.shape == (64, 64, 64) and voxel == pytest.approx(5.7)


def test_euler_matrix_is_relion_zyz():
    A = euler_to_matrix(np.array([30.0]), np.array([50.0]), np.array([-70.0]))[0]
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    def ry(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    np.testing.assert_allclose(A, rz(70.0) @ ry(-50.0) @ rz(-30.0), atol=1e-12)
    # beam direction in the map's frame = third row of A
    t, r = np.deg2rad(50.0), np.deg2rad(30.0)
    np.testing.assert_allclose(A[2], [np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], atol=1e-12)


def test_projection_axes_exact(small_volume):
    vol, _ = small_volume
    p = project(vol, np.array([0.0, 0.0]), np.array([0.0, 180.0])).numpy()
    np.testing.assert_allclose(p[0], vol.sum(0), atol=1e-4)  # along z
    # tilt 180 about y looks from below: the mirror image x -> -x (about the centre)
    np.testing.assert_allclose(p[1][:, 1:], vol.sum(0)[:, 1:][:, ::-1], atol=1e-4)
    # its 2D FFT is the kz = 0 plane of the 3D FFT (Fourier-slice theorem)
    F3 = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(torch.from_numpy(vol).double())))
    torch.testing.assert_close(fft2c(torch.from_numpy(p[0]).double()), F3[BOX // 2], atol=1e-2, rtol=1e-5)


def test_projection_matches_central_slice(small_volume):
    vol, _ = small_volume
    rot = np.array([23.0, 110.0, -75.0])
    tilt = np.array([37.0, 81.0, 128.0])
    real = fft2c(project(vol, rot, tilt).double())
    fourier = fft2c(_SliceProjector(vol)(rot, tilt).double())
    band = radius_grid(BOX) <= (2 / 3) * (BOX // 2)
    for a, b in zip(real, fourier):
        a, b = a[band], b[band]
        corr = (a * b.conj()).sum().real / (a.abs().norm() * b.abs().norm())
        assert corr > 0.99


@pytest.mark.parametrize("box", [32, 33])
def test_slice_projector_is_the_full_transforms_slice_inside_nyquist(bundled, box):
    """The half transform (conjugate for negative x) gives the full 3D transform's trilinear slice.

    Reference: the whole padded map transformed in float64 and sampled on the
    same slice points. Inside the inscribed Nyquist circle they agree to float32
    rounding; beyond it (the image's corners) the reference lacks the +Nyquist
    plane that the half transform has.
    """
    import torch.nn.functional as nnf

    vol, _ = _prepare_volume(*bundled, box, None)
    rot, tilt = np.array([23.0, 110.0, -75.0, 0.0]), np.array([37.0, 81.0, 128.0, 90.0])
    pad = 2 * box
    full = torch.zeros((pad,) * 3, dtype=torch.float64)
    o = pad // 2 - box // 2
    full[o : o + box, o : o + box, o : o + box] = torch.from_numpy(vol).double()
    sinc2 = torch.sinc((torch.arange(pad, dtype=torch.float64) - pad // 2) / pad) ** 2
    full = full / (sinc2[:, None, None] * sinc2[None, :, None] * sinc2[None, None, :])
    F = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(full)))
    j = (torch.arange(box, dtype=torch.float64) - box // 2) * 2
    yy, xx = torch.meshgrid(j, j, indexing="ij")
    pts = torch.stack([xx, yy, torch.zeros_like(xx)], dim=-1).reshape(-1, 3)
    src = torch.einsum("pi,mij->mpj", pts, torch.from_numpy(euler_to_matrix(rot, tilt))) + pad // 2
    grid = (src * (2.0 / (pad - 1)) - 1.0).reshape(1, len(rot), box, box, 3)
    sampled = nnf.grid_sample(torch.stack([F.real, F.imag])[None], grid, mode="bilinear", align_corners=True)[0]
    expected = torch.complex(sampled[0], sampled[1])
    got = fft2c(_SliceProjector(vol)(rot, tilt).double())
    inside = radius_grid(box) < box // 2 - 1
    err = (got - expected)[:, inside].abs().max() / expected.abs().max()
    assert err < 1e-5, err


def test_projections_in_slabs_sum_as_in_one(bundled, monkeypatch):
    import cryo2d.simulate as sim

    vol, _ = _prepare_volume(*bundled, BOX, None)
    rot, tilt = np.array([23.0, 110.0, -75.0]), np.array([37.0, 81.0, 128.0])
    whole = project(vol, rot, tilt)
    monkeypatch.setattr(sim, "_GRID_POINTS", BOX * BOX * 5)  # one projection at a time, 5 z rows a slab
    torch.testing.assert_close(project(vol, rot, tilt), whole, atol=1e-5 * float(whole.abs().max()), rtol=0)


def test_images_do_not_depend_on_how_many_are_rendered_at_once(bundled, monkeypatch):
    import cryo2d.simulate as sim

    kwargs = dict(n_particles=40, box=BOX, junk_fraction=0.3, views="uniform", seed=5)
    whole = simulate(*bundled, **kwargs)
    monkeypatch.setattr(sim, "_CHUNK_PIXELS", BOX * BOX * 7)  # 7 images at a time
    monkeypatch.setattr(sim, "_GRID_POINTS", BOX * BOX * 3)  # 3 slices a projector call
    chunked = simulate(*bundled, **kwargs)
    np.testing.assert_array_equal(chunked.images, whole.images)


def test_a_doublets_truth_is_its_first_particles_pose(bundled):
    """truth.csv gives a doublet the pose of its first particle, drawn half the pair's offset from the centre."""
    sim = simulate(*bundled, n_particles=60, box=48, add_noise=False, seed=2, junk_fraction=0.5)
    t = sim.truth
    vol, _ = _prepare_volume(*bundled, 48, None)
    rows = np.flatnonzero(t.kind.to_numpy() == "doublet")
    assert len(rows) >= 4
    for i in rows:
        r = t.iloc[i]
        clean = rotate_images(project(vol, np.array([r.rot_deg]), np.array([r.tilt_deg])).double(),
                              torch.tensor([r.psi_deg]))
        model = ifft2c(fft2c(clean) * ctf_grid(sim.ctf.subset(np.array([i])), 48, sim.pixel_size_angst,
                                               dtype=torch.float64), real=True)[0].numpy()
        cc = np.fft.ifft2(np.fft.fft2(sim.images[i].astype(np.float64)) * np.conj(np.fft.fft2(model))).real
        y, x = np.unravel_index(cc.argmax(), cc.shape)
        peak = np.array([x, y]) - 48 * (np.array([x, y]) >= 24)  # where the first particle sits
        assert np.abs(peak - [r.shift_x_px, r.shift_y_px]).max() <= 1.0, (i, peak, r.shift_x_px, r.shift_y_px)
        assert np.hypot(r.shift_x_px, r.shift_y_px) > 3  # off the pair's centre (0.3 diameters)


def test_ground_truth_consistent(bundled):
    sim = simulate(*bundled, n_particles=120, box=BOX, add_noise=False, seed=3, junk_fraction=0.0)
    t = sim.truth
    assert (t.kind == "particle").all()
    idx = np.arange(20)
    views = torch.from_numpy(sim.view_projections)
    clean = shift_images(
        rotate_images(views[t.view.values[idx]].double(), torch.from_numpy(t.psi_deg.values[idx])),
        torch.from_numpy(t[["shift_x_px", "shift_y_px"]].values[idx]),
    ) * torch.from_numpy(t.scale.values[idx])[:, None, None]
    H = ctf_grid(sim.ctf.subset(idx), BOX, sim.pixel_size_angst, dtype=torch.float64)
    expected = ifft2c(fft2c(clean) * H, real=True)
    torch.testing.assert_close(torch.from_numpy(sim.images[idx]).double(), expected, atol=2e-3 * expected.abs().max().item(), rtol=0)
    # the view projections are projections of the map at the views' angles, and protein is bright
    vol, _ = _prepare_volume(*bundled, BOX, None)
    rot, tilt = np.array(sim.meta["view_rot_deg"]), np.array(sim.meta["view_tilt_deg"])
    np.testing.assert_allclose(sim.view_projections, project(vol, rot, tilt).numpy(), atol=1e-4)
    assert sim.view_projections.sum() > 0 and sim.view_projections.min() > -0.03 * sim.view_projections.max()  # Fourier-resampling ripple only
    first = t.iloc[0]
    assert first.rot_deg == pytest.approx(rot[first.view]) and first.tilt_deg == pytest.approx(tilt[first.view])
    # CTF(0) = +Q0 keeps the low-frequency contrast positive
    assert sim.images.sum() > 0


def test_measured_snr(bundled):
    kw = dict(n_particles=150, box=BOX, snr=0.2, junk_fraction=0.0, seed=5)
    noisy = simulate(*bundled, **kw).images.astype(np.float64)
    clean = simulate(*bundled, add_noise=False, **kw).images.astype(np.float64)
    inside = (radius_grid(BOX) <= 0.45 * BOX).numpy()
    sig, noi = [], []
    for y, x in zip(noisy, clean):
        X = np.stack([x.ravel(), np.ones(x.size)], 1)
        coef, *_ = np.linalg.lstsq(X, y.ravel(), rcond=None)  # normalisation is affine: y = a·x + b + noise
        sig.append(np.var(coef[0] * x[inside]))
        noi.append(np.var(y.ravel() - X @ coef))
    assert np.mean(sig) / np.mean(noi) == pytest.approx(0.2, rel=0.2)
    # RELION-style normalisation: background mean 0, sd 1
    bg = (radius_grid(BOX) > 0.45 * BOX).numpy()
    assert np.abs(noisy[:, bg].mean(1)).max() < 1e-4 and np.abs(noisy[:, bg].std(1) - 1).max() < 1e-3


def test_same_seed_same_bytes(bundled, tmp_path):
    kw = dict(n_particles=60, box=BOX, seed=11)
    a = write_simulation(simulate(*bundled, **kw), tmp_path / "a")
    b = write_simulation(simulate(*bundled, **kw), tmp_path / "b")
    c = simulate(*bundled, n_particles=60, box=BOX, seed=12)
    for name in ("particles.mrcs", "particles.star", "truth.csv", "views.mrcs", "truth.json"):
        assert hashlib.sha256((a / name).read_bytes()).digest() == hashlib.sha256((b / name).read_bytes()).digest(), name
    assert not np.array_equal(mrcfile.read(a / "particles.mrcs"), c.images)


def test_kinds_and_rare_view_counts(bundled):
    sim = simulate(*bundled, n_particles=600, box=BOX, junk_fraction=0.15, rare_view_fraction=0.04, n_views=6, seed=2)
    kinds = sim.truth.kind.value_counts()
    assert kinds["noise"] == kinds["ice"] == kinds["doublet"] == 30 and kinds["particle"] == 510
    assert sim.rare_view == 5 and sim.view_projections.shape == (6, BOX, BOX)
    views = sim.truth.view[sim.truth.kind == "particle"].value_counts()
    assert views[5] == round(0.04 * 510)
    assert set(views.index) == set(range(6)) and views.drop(5).max() - views.drop(5).min() <= 1
    assert (sim.truth.view[sim.truth.kind != "particle"] == -1).all()
    assert sim.meta["max_view_similarity"] < 0.97  # distinct even after best in-plane rotation / mirror


@pytest.mark.parametrize("mode", ["uniform", "preferred"])
def test_uniform_and_preferred_views(bundled, mode):
    sim = simulate(*bundled, n_particles=400, box=BOX, views=mode, n_views=8, junk_fraction=0.0, rare_view_fraction=0.05, seed=4)
    counts = sim.truth.view.value_counts()
    assert counts[sim.rare_view] == 20
    rare = sim.truth[sim.truth.view == sim.rare_view]
    assert rare.tilt_deg.std() < 5  # one direction, small jitter
    if mode == "preferred":
        assert sim.rare_view == 9 and counts[8] == 200
    else:
        assert sim.rare_view == 8 and counts.drop(8).min() > 20
    assert sim.view_projections.shape[0] == sim.rare_view + 1
    assert np.isfinite(sim.images).all()


@pytest.mark.parametrize("kwargs", [{"rare_view_fraction": 0.0}, {"rare_view_fraction": 0.0, "views": "uniform"},
                                    {"n_views": 1}])
def test_no_rare_view(bundled, tmp_path, capsys, kwargs):
    """A rare view fraction of 0, or one discrete view (it takes every particle): no rare view, written as null."""
    sim = simulate(*bundled, n_particles=60, box=BOX, seed=3, **kwargs)
    assert sim.rare_view is None
    if kwargs.get("n_views") == 1:
        assert (sim.truth.view[sim.truth.kind == "particle"] == 0).all()
    else:  # the id the rare view would have holds no particle
        assert sim.truth.view.max() < sim.view_projections.shape[0] - 1
    info = json.loads((write_simulation(sim, tmp_path / "sim") / "truth.json").read_text())
    assert info["rare_view"] is None

    from cryo2d.cli.main import main

    args = ["--n-views", "1"] if "n_views" in kwargs else ["--rare-fraction", "0"]
    assert main(["simulate", "bundled", "-o", str(tmp_path / "cli"), "-n", "40", "--box", "32", *args]) == 0
    assert "; no rare view)" in capsys.readouterr().out


def test_written_files(bundled, tmp_path):
    sim = simulate(*bundled, n_particles=40, box=BOX, seed=1)
    out = write_simulation(sim, tmp_path / "sim")
    star = starfile.read(out / "particles.star")
    optics, particles = star["optics"], star["particles"]
    assert optics.loc[0, "rlnImagePixelSize"] == pytest.approx(sim.pixel_size_angst)
    assert optics.loc[0, "rlnImageSize"] == BOX and optics.loc[0, "rlnVoltage"] == 300
    assert particles.rlnImageName.iloc[0] == "000001@particles.mrcs" and len(particles) == 40
    np.testing.assert_allclose(particles.rlnDefocusU, sim.ctf.defocus_u_angst, rtol=1e-6)
    with mrcfile.open(out / "particles.mrcs") as mrc:
        assert mrc.data.shape == (40, BOX, BOX) and mrc.data.dtype == np.float32
        assert mrc.voxel_size.x == pytest.approx(sim.pixel_size_angst, rel=1e-5)
        np.testing.assert_array_equal(mrc.data, sim.images)
    truth = pd.read_csv(out / "truth.csv")
    assert list(truth.kind) == list(sim.truth.kind)
    info = pd.read_json(out / "truth.json", typ="series")
    assert info["rare_view"] == sim.rare_view and info["seed"] == 1
    assert not list(out.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 2, 1), (2, 3, 1), (2, 1, 3)])
def test_a_map_stored_along_other_axes_is_read_as_z_y_x(tmp_path, order):
    """MAPC, MAPR, MAPS (the axes of the columns, rows and sections): a map stored with sections along x
    (as some programs write them) reads as the same [z, y, x] volume."""
    volume = np.random.default_rng(0).standard_normal((10, 12, 14)).astype(np.float32)  # [z, y, x]
    mapc, mapr, maps = order
    stored = np.transpose(volume, [3 - maps, 3 - mapr, 3 - mapc])  # data[section, row, column]
    path = tmp_path / "m.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(stored)
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = mapc, mapr, maps
    read, _ = read_map(path)
    n = 14
    np.testing.assert_array_equal(read[2:12, 1:13, :], volume)  # padded to 14³ about its centre
    assert read.shape == (n, n, n)


def test_read_map_errors(tmp_path):
    with pytest.raises(Cryo2DError, match="missing.mrc"):
        read_map(tmp_path / "missing.mrc")
    bad = tmp_path / "bad.mrc"
    bad.write_text("not an mrc")
    with pytest.raises(Cryo2DError, match="bad.mrc"):
        read_map(bad)
    flat = tmp_path / "flat.mrc"
    mrcfile.new(flat, np.zeros((2, 8, 8), np.float32)).close()
    with pytest.raises(Cryo2DError, match=r"flat.mrc: a map of shape \(2, 8, 8\) is not a particle's"):
        read_map(flat)
    stack = tmp_path / "stack.mrcs"
    with mrcfile.new(stack) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), np.float32))
        mrc.set_image_stack()
    with pytest.raises(Cryo2DError, match="stack.mrcs: an image stack \\(8 images\\), not a 3D map"):
        read_map(stack)
    odd = tmp_path / "odd.mrc"
    with mrcfile.new(odd) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), np.float32))
        mrc.voxel_size = (1.0, 1.0, 2.0)
    with pytest.raises(Cryo2DError, match=r"odd.mrc: voxels of different sizes along x, y, z \(1, 1, 2 Å\)"):
        read_map(odd)


def test_a_map_that_is_not_a_cube_is_padded_about_its_centre(tmp_path):
    """A (z, y, x) = (9, 12, 10) map lands in a 12³ cube with its centre voxel (4, 6, 5) at (6, 6, 6)."""
    data = np.random.default_rng(0).normal(size=(9, 12, 10)).astype(np.float32)
    path = tmp_path / "long.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 2.0
    volume, voxel = read_map(path)
    assert volume.shape == (12, 12, 12) and voxel == 2.0
    np.testing.assert_array_equal(volume[2:11, :, 1:11], data)
    assert volume[6, 6, 6] == data[4, 6, 5] and volume.sum() == pytest.approx(data.sum(), rel=1e-5)
    sim = simulate(volume, voxel, n_particles=20, box=16, seed=0)
    assert np.isfinite(sim.images).all()


@pytest.mark.parametrize("pixel", [-1.0, 0.0, float("inf")])
def test_non_positive_pixel_size_is_refused(bundled, pixel):
    """A negative pixel size used to be written into the STAR file as is (inf: images "at inf Å")."""
    with pytest.raises(Cryo2DError, match=f"pixel size must be positive and finite, got {pixel}"):
        simulate(*bundled, n_particles=10, box=16, pixel_size_angst=pixel)


def test_pixel_size_that_would_blow_up_the_map_is_refused(bundled):
    """1e-9 Å resampled the 64-voxel map to 3.6e11 voxels across: a torch traceback (storage overflow)."""
    with pytest.raises(Cryo2DError, match=r"would resample the map \(64 voxels of 5.7 Å\) to more than 1024 voxels"):
        simulate(*bundled, n_particles=10, box=16, pixel_size_angst=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"snr": float("nan")}, "snr must be positive, got nan"),  # used to give noise-free images
    ({"junk_fraction": 1.5}, r"junk fraction must be in \[0, 1\], got 1.5"),
    ({"rare_view_fraction": -0.1}, r"rare view fraction must be in \[0, 1\], got -0.1"),
    ({"rare_view_fraction": 1.0}, r"rare view fraction must be below 1 \(the other views need particles\)"),
])
def test_bad_snr_and_fractions_are_refused_by_name(bundled, kwargs, message):
    with pytest.raises(Cryo2DError, match=message):
        simulate(*bundled, n_particles=10, box=16, **kwargs)


def test_cli_refuses_a_non_positive_map_pixel_size(tmp_path, capsys):
    from cryo2d.cli.main import main

    assert main(["simulate", "bundled", "-o", str(tmp_path / "sim"), "--map-pixel-size", "-2"]) == 1
    assert "--map-pixel-size must be positive and finite, got -2.0" in capsys.readouterr().err
    assert main(["simulate", "bundled", "-o", str(tmp_path / "sim"), "--map-pixel-size", "inf"]) == 1  # was a traceback
    assert "--map-pixel-size must be positive and finite, got inf" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()


def test_cli_refuses_an_infinite_snr_and_folders_of_other_particles(tmp_path, capsys):
    """--snr inf made blank 'noise' and 'ice' images; -o over a job's or real data's particle files replaced them."""
    from cryo2d.cli.main import main

    assert main(["simulate", "bundled", "-o", str(tmp_path / "sim"), "--snr", "inf"]) == 1
    assert "--snr must be positive and finite, got inf" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()
    small = ["-n", "20", "--box", "16"]
    assert main(["simulate", "bundled", "-o", str(tmp_path / "sim"), *small]) == 0
    assert main(["simulate", "bundled", "-o", str(tmp_path / "sim"), *small, "--seed", "1"]) == 0  # a simulation's: replaced
    for folder, held, message in (("job", "checkpoint.pt", "holds a classification job (checkpoint.pt)"),
                                  ("extract", "particles.star", "holds particles.star, not from cryo2d simulate (no truth.json)")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / held).write_text("mine")
        capsys.readouterr()
        assert main(["simulate", "bundled", "-o", str(tmp_path / folder), *small]) == 1
        assert capsys.readouterr().err.strip() == f"cryo2d: error: {tmp_path / folder}: {message}; choose another folder"
        assert [p.name for p in (tmp_path / folder).iterdir()] == [held]


@pytest.mark.parametrize("argv, message", [(["-n", "0"], "-n must be at least 1, got 0"),
                                           (["--box", "10"], "--box must be at least 16, got 10"),
                                           (["--classes", "0"], "--classes must be at least 1, got 0"),
                                           (["-n", "20", "--classes", "30"], "--classes 30 is more than the 20 particles (-n)"),
                                           (["--snr", "-1"], "--snr must be positive and finite, got -1.0")])
def test_demo_refuses_bad_values_before_simulating(tmp_path, capsys, argv, message):
    from cryo2d.cli.main import main

    assert main(["demo", "-o", str(tmp_path / "demo"), *argv]) == 1
    assert capsys.readouterr().err.strip() == f"cryo2d: error: {message}"
    assert not (tmp_path / "demo").exists()


def test_a_map_of_no_positive_density_is_refused_and_dark_protein_noted(bundled, tmp_path, capsys):
    """Clipped to its positive part, a map of dark protein gave blank images (all negative) or particles
    made of the solvent's positive noise (EMD-1832 times -1), labelled as particles all the same."""
    volume, voxel = bundled
    with pytest.raises(Cryo2DError, match=r"^simulate: map: no positive density"):
        simulate(-np.abs(volume), voxel, n_particles=10, box=16)
    with pytest.raises(Cryo2DError, match=r"^simulate: map: no positive density"):
        simulate(np.zeros_like(volume), voxel, n_particles=10, box=16)
    assert dark_map_note(volume) is None  # its smoothed minimum: 0.15 of its maximum
    assert dark_map_note(-volume).startswith("its strongest density is negative (smoothed: -1.09, against 0.159 ")

    from cryo2d.cli.main import main

    for name, data, code in (("dark.mrc", -volume, 0), ("empty.mrc", np.zeros_like(volume), 1)):
        path = tmp_path / name
        with mrcfile.new(path) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = voxel
        assert main(["simulate", str(path), "-o", str(tmp_path / name[:-4]), "-n", "10", "--box", "16"]) == code
        err = capsys.readouterr().err.strip()
        if code:
            assert err == f"cryo2d: error: {path}: no positive density (the simulator needs the protein positive; " \
                          "a map of dark protein? multiply it by -1)"
            assert not (tmp_path / name[:-4]).exists()
        else:
            assert err.startswith(f"{path}: its strongest density is negative") and "\n" not in err


def test_junk_only_sets_are_at_the_asked_snr_whatever_the_maps_scale(bundled):
    """With no particle the noise was sqrt(1/snr) in the map's own units: the doublets of a map scaled
    by 1000 stood out 2,000 times above the noise, those of a map scaled by 0.001 vanished in it."""
    volume, voxel = bundled
    sims = [simulate(volume * a, voxel, n_particles=60, box=BOX, junk_fraction=1.0, seed=2) for a in (1e-3, 1e3)]
    assert sims[1].meta["noise_sd"] / sims[0].meta["noise_sd"] == pytest.approx(1e6, rel=1e-4)
    np.testing.assert_allclose(sims[0].images, sims[1].images, atol=2e-4)
    # the noise is the one a set with particles would have: the same seed's doublets at half junk
    half = simulate(volume, voxel, n_particles=60, box=BOX, junk_fraction=0.5, seed=2)
    inside = (radius_grid(BOX) <= 0.3 * BOX).numpy()

    def contrast(sim):
        return np.mean([im[inside].var() for im in sim.images[(sim.truth.kind == "doublet").to_numpy()]])
    assert contrast(sims[0]) == pytest.approx(contrast(half), rel=0.15)


def test_preferred_views_refuse_a_rare_view_larger_than_their_other_half(bundled, tmp_path, capsys):
    """Half the particles go to the preferred view: a rare view fraction of 0.6 was a numpy traceback."""
    with pytest.raises(Cryo2DError, match=r"rare view fraction 0.6 with preferred views.*at most 0.5"):
        simulate(*bundled, n_particles=20, box=16, views="preferred", rare_view_fraction=0.6)
    sim = simulate(*bundled, n_particles=20, box=16, views="preferred", rare_view_fraction=0.5, junk_fraction=0)
    assert sim.truth.view.value_counts().to_dict() == {8: 10, 9: 10}

    from cryo2d.cli.main import main

    argv = ["simulate", "bundled", "-o", str(tmp_path / "sim"), "-n", "20", "--box", "16", "--views", "preferred"]
    assert main([*argv, "--rare-fraction", "0.9"]) == 1
    assert capsys.readouterr().err.startswith("cryo2d: error: simulate: rare view fraction 0.9 with preferred views")


@pytest.mark.parametrize("kwargs, message", [
    ({"voltage_kv": 0.0}, r"voltage must be positive and finite, got 0.0"),  # NaN images
    ({"amplitude_contrast": 1.5}, r"amplitude contrast must be in \[0, 1\), got 1.5"),  # NaN images
    ({"defocus_range_angst": (30000.0, 10000.0)}, r"defocus range must be two finite values, low then high"),
    ({"defocus_range_angst": (float("nan"), 1.0)}, r"defocus range must be two finite values"),
    ({"max_astigmatism_angst": -5.0}, r"maximum astigmatism must be finite, from 0, got -5.0"),
    ({"scale_sd": -1.0}, r"scale sd must be finite, from 0, got -1.0"),
    ({"max_shift_px": float("inf")}, r"maximum shift must be finite, from 0, got inf"),
])
def test_optics_and_draws_out_of_range_are_refused_by_name(bundled, kwargs, message):
    with pytest.raises(Cryo2DError, match="^simulate: " + message):
        simulate(*bundled, n_particles=10, box=16, **kwargs)


@pytest.mark.parametrize("units", [1e-15, 1e30])
def test_a_map_in_any_units_gives_the_same_images(bundled, units):
    """A map in units of 1e-12 or less gave images left unnormalised (background sd 8e-4 at 1e-15) and
    views chosen at random (their similarities under a fixed floor); now a power of 2 scales it first."""
    volume, voxel = bundled
    ref = simulate(volume, voxel, n_particles=40, box=BOX, seed=4)
    sim = simulate(volume * np.float32(units), voxel, n_particles=40, box=BOX, seed=4)
    assert sim.meta["view_rot_deg"] == ref.meta["view_rot_deg"]
    np.testing.assert_allclose(sim.images, ref.images, atol=1e-5)
    np.testing.assert_allclose(sim.view_projections / units, ref.view_projections, rtol=1e-5, atol=1e-5)
    assert sim.meta["noise_sd"] / units == pytest.approx(ref.meta["noise_sd"], rel=1e-6)
    clean = simulate(volume * np.float32(units), voxel, n_particles=10, box=BOX, seed=4, add_noise=False)
    clean_ref = simulate(volume, voxel, n_particles=10, box=BOX, seed=4, add_noise=False)
    np.testing.assert_allclose(clean.images / units, clean_ref.images, rtol=1e-5, atol=1e-5)


def test_demo_runs_the_job_and_says_the_split_start_stages(tmp_path, capsys):
    """A small demo end to end: the job's files, the scores on stdout, and on stderr the split start's
    stage lines (1 → 2 → 4 classes) before the first iteration's."""
    import json

    from cryo2d.cli.main import main

    assert main(["demo", "-o", str(tmp_path / "demo"), "-n", "300", "--classes", "4", "--box", "32"]) == 0
    out, err = capsys.readouterr()
    scores = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert 0 <= scores["purity"] <= 1 and scores["n_particle_classes"] + scores["n_junk_classes"] <= 4
    lines = err.splitlines()
    stages = [i for i, line in enumerate(lines) if ": split start, stage " in line]
    assert [lines[i].split(": split start, ")[1].split(" in ")[0] for i in stages] == [
        "stage 1 of 2: 1 class, split into 2", "stage 2 of 2: 2 classes, split into 4"], err
    first = next(i for i, line in enumerate(lines) if line.startswith("iter   1 "))
    assert max(stages) < first
    assert {"classes.mrcs", "particles.star", "gallery.png"} <= {p.name for p in (tmp_path / "demo/job").iterdir()}
