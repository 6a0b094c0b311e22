"""CTF against RELION's CTF::getCTF formula evaluated by hand in float64."""
from __future__ import annotations

import math
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cryo2d.ctf import ctf_2d, ctf_grid, wavelength_angst
from cryo2d.particles import CTFParams


def _params(**kw) -> CTFParams:
    base = dict(
        defocus_u_angst=[15000.0],
        defocus_v_angst=[15000.0],
        defocus_angle_deg=[0.0],
        voltage_kv=[300.0],
        cs_mm=[2.7],
        amplitude_contrast=[0.1],
        phase_shift_deg=[0.0],
        bfactor_angst2=[0.0],
    )
    base.update(kw)
    return CTFParams(**{k: np.asarray(v, dtype=np.float64) for k, v in base.items()})


def _by_hand(x, y, u, v, ang_deg, kv, cs_mm, q0, ps_deg, bfac):
    volts = kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1 + volts * 0.978466e-6))
    cs = cs_mm * 1e7
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs * lam**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    k4 = -bfac / 4
    k5 = math.radians(ps_deg)
    u2 = x * x + y * y
    theta = math.atan2(y, x)
    avg, dev = -(u + v) / 2, -(u - v) / 2
    deltaf = avg + dev * math.cos(2 * (theta - math.radians(ang_deg)))
    chi = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -math.sin(chi) * math.exp(k4 * u2)


def test_amplitude_scale_multiplies_the_whole_ctf():
    """RELION's ``_rlnCtfScalefactor`` (CryoSPARC ``ctf/scale``): CTF = scale x -sin(chi) x envelope."""
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 0.25, 40)
    a = rng.uniform(-math.pi, math.pi, 40)
    pts = torch.tensor(np.stack([s * np.cos(a), s * np.sin(a)], -1))
    kw = dict(defocus_u_angst=[18000.0, 9000.0], defocus_v_angst=[17000.0, 9500.0], defocus_angle_deg=[33.0, -10.0],
              voltage_kv=[300.0, 200.0], cs_mm=[2.7, 2.0], amplitude_contrast=[0.1, 0.07], phase_shift_deg=[0.0, 0.0],
              bfactor_angst2=[80.0, 0.0])
    scaled = ctf_2d(pts, _params(**kw, amplitude_scale=[0.7, 1.3]), dtype=torch.float64).numpy()
    assert _params(**kw).amplitude_scale.tolist() == [1.0, 1.0]  # absent: ones
    plain = ctf_2d(pts, _params(**kw), dtype=torch.float64).numpy()
    want = np.array([[_by_hand(x, y, *[kw[k][i] for k in kw]) for x, y in pts.numpy()] for i in range(2)])
    np.testing.assert_allclose(plain, want, atol=1e-9)
    np.testing.assert_allclose(scaled, want * np.array([[0.7], [1.3]]), atol=1e-9)


def test_phase_flipped_images_have_the_absolute_ctf():
    """RELION's ``_rlnCtfDataArePhaseFlipped``: images times sign(CTF) have |CTF| as their CTF."""
    s = np.linspace(0.0, 0.25, 60)
    pts = torch.tensor(np.stack([s, 0.5 * s], -1))
    kw = dict(defocus_u_angst=[18000.0, 18000.0], defocus_v_angst=[17000.0, 17000.0], defocus_angle_deg=[33.0, 33.0],
              voltage_kv=[300.0, 300.0], cs_mm=[2.7, 2.7], amplitude_contrast=[0.1, 0.1], phase_shift_deg=[0.0, 0.0],
              bfactor_angst2=[80.0, 80.0])
    plain = ctf_2d(pts, _params(**kw), dtype=torch.float64).numpy()
    assert _params(**kw).phase_flipped.tolist() == [0.0, 0.0]  # absent: zeros
    flipped = ctf_2d(pts, _params(**kw, phase_flipped=[0.0, 1.0]), dtype=torch.float64).numpy()
    want = np.array([_by_hand(x, y, *[kw[k][0] for k in kw]) for x, y in pts.numpy()])
    assert (want < -0.5).any() and (want > 0.5).any()
    np.testing.assert_allclose(flipped[0], want, atol=1e-9)
    np.testing.assert_allclose(flipped[1], np.abs(want), atol=1e-9)
    np.testing.assert_array_equal(plain[0], flipped[0])


def test_rescaled_ctf_is_the_ctf_at_scaled_frequencies():
    """rescale_ctf(params, s)(f) = CTF(s f): a particle of another pixel size on the run's grid."""
    from cryo2d.ctf import rescale_ctf

    rng = np.random.default_rng(4)
    pts = torch.tensor(rng.uniform(-0.2, 0.2, (50, 2)))
    kw = dict(defocus_u_angst=[18000.0, 9000.0], defocus_v_angst=[17000.0, 9500.0], defocus_angle_deg=[33.0, -10.0],
              voltage_kv=[300.0, 200.0], cs_mm=[2.7, 2.0], amplitude_contrast=[0.1, 0.07], phase_shift_deg=[20.0, 0.0],
              bfactor_angst2=[80.0, 10.0])
    params, s = _params(**kw), np.array([1.0, 0.985])
    got = ctf_2d(pts, rescale_ctf(params, s), dtype=torch.float64).numpy()
    want = np.stack([ctf_2d(pts * float(s[i]), params.subset(np.array([i])), dtype=torch.float64).numpy()[0]
                     for i in range(2)])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert np.abs(want[1] - ctf_2d(pts, params, dtype=torch.float64).numpy()[1]).max() > 0.1  # 1.5 % matters


def test_wavelength_300kv():
    assert wavelength_angst(300.0) == pytest.approx(0.019687, abs=1e-6)
    assert wavelength_angst(200.0) == pytest.approx(0.025079, abs=1e-6)


@pytest.mark.parametrize(
    "u,v,ang,kv,cs,q0,ps,bfac",
    [
        (15000, 15000, 0, 300, 2.7, 0.1, 0, 0),
        (21187, 20363, 7.48, 300, 2.7, 0.1, 0, 0),  # astigmatism
        (12000, 10500, -63.0, 200, 2.0, 0.07, 0, 0),
        (5000, 4800, 120.0, 300, 2.7, 0.1, 90.0, 0),  # phase plate
        (18000, 17000, 33.0, 300, 0.01, 0.1, 0, 80.0),  # B-factor
    ],
)
def test_matches_formula(u, v, ang, kv, cs, q0, ps, bfac):
    params = _params(
        defocus_u_angst=[u], defocus_v_angst=[v], defocus_angle_deg=[ang], voltage_kv=[kv],
        cs_mm=[cs], amplitude_contrast=[q0], phase_shift_deg=[ps], bfactor_angst2=[bfac],
    )
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 0.25, 40)
    a = rng.uniform(-math.pi, math.pi, 40)
    pts = np.stack([s * np.cos(a), s * np.sin(a)], -1)
    got = ctf_2d(torch.tensor(pts), params, dtype=torch.float64)[0].numpy()
    want = np.array([_by_hand(x, y, u, v, ang, kv, cs, q0, ps, bfac) for x, y in pts])
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_zero_frequency_is_q0_and_vectorised():
    params = _params(
        defocus_u_angst=[10000, 20000, 30000], defocus_v_angst=[9000, 21000, 30000],
        defocus_angle_deg=[0, 45, 90], voltage_kv=[300] * 3, cs_mm=[2.7] * 3,
        amplitude_contrast=[0.1, 0.07, 0.2], phase_shift_deg=[0] * 3, bfactor_angst2=[0, 50, 100],
    )
    grid = ctf_grid(params, 32, 2.0)
    assert grid.shape == (3, 32, 32) and grid.dtype == torch.float32
    np.testing.assert_allclose(grid[:, 16, 16].numpy(), [0.1, 0.07, 0.2], atol=1e-6)
    # rfft layout: zero frequency at [0, 0], x = 0 .. box//2
    half = ctf_grid(params, 32, 2.0, rfft=True)
    assert half.shape == (3, 32, 17)
    np.testing.assert_allclose(half[:, 0, 0].numpy(), [0.1, 0.07, 0.2], atol=1e-6)
    # the same frequency in both layouts: x = 5/32, y = -3/32 cycles/px
    np.testing.assert_allclose(half[:, 32 - 3, 5].numpy(), grid[:, 16 - 3, 16 + 5].numpy(), atol=1e-6)
    # the centred grid puts x along columns, y along rows
    x, y = 5 / 64, -3 / 64
    want = _by_hand(x, y, 20000, 21000, 45, 300, 2.7, 0.07, 0, 50)
    assert grid[1, 16 - 3, 16 + 5].item() == pytest.approx(want, abs=1e-5)


def test_swap_u_v_plus_90_degrees_is_identical():
    a = _params(defocus_u_angst=[21000], defocus_v_angst=[19000], defocus_angle_deg=[30.0])
    b = _params(defocus_u_angst=[19000], defocus_v_angst=[21000], defocus_angle_deg=[120.0])
    torch.testing.assert_close(ctf_grid(a, 48, 1.5), ctf_grid(b, 48, 1.5), atol=1e-5, rtol=0)


def test_defocus_angle_direction():
    # U is the defocus along the direction at `angle` from the x axis
    p = _params(defocus_u_angst=[25000], defocus_v_angst=[10000], defocus_angle_deg=[90.0])
    iso_u = _params(defocus_u_angst=[25000], defocus_v_angst=[25000])
    f = torch.tensor([[0.0, 0.05]], dtype=torch.float64)  # along +y
    torch.testing.assert_close(ctf_2d(f, p, dtype=torch.float64), ctf_2d(f, iso_u, dtype=torch.float64))


@pytest.mark.parametrize(
    "box, pixel, kv, cs, q0, du, dv, angle, phase",
    [(64, 1.5, 300.0, 2.7, 0.1, 15000.0, 11000.0, 30.0, 20.0), (48, 3.2, 200.0, 0.01, 0.07, 22000.0, 25000.0, 125.0, 0.0)],
)
def test_ctf_grid_equals_relion_ctf_toolbox(tmp_path, box, pixel, kv, cs, q0, du, dv, angle, phase):
    """RELION 3.1's own CTF image (relion_ctf_toolbox --simulate): same values, layout and astigmatism direction."""
    tool = shutil.which("relion_ctf_toolbox")
    if tool is None:
        pytest.skip("RELION (relion_ctf_toolbox) not installed")
    out = tmp_path / "ctf.mrc"
    subprocess.run([tool, "--simulate", str(out), "--angpix", str(pixel), "--box", str(box), "--kV", str(kv),
                    "--Cs", str(cs), "--Q0", str(q0), "--defU", str(du), "--defV", str(dv), "--defAng", str(angle),
                    "--phase_shift", str(phase)], check=True, capture_output=True)
    with mrcfile.open(out) as mrc:
        relion = np.array(mrc.data, dtype=np.float64)
    params = _params(defocus_u_angst=[du], defocus_v_angst=[dv], defocus_angle_deg=[angle], voltage_kv=[kv],
                     cs_mm=[cs], amplitude_contrast=[q0], phase_shift_deg=[phase])
    ours = ctf_grid(params, box, pixel, dtype=torch.float64)[0].numpy()
    np.testing.assert_allclose(ours, relion, atol=1e-5)  # RELION writes float32
