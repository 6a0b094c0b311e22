"""Working geometry: cropped box, E-step radii, Fourier point sets, Hermitian grids."""
from __future__ import annotations

import pytest
import torch

from cryo2d.em.config import EMConfig
from cryo2d.em.geometry import disc_points, hermitian_grid, make_geometry, soft_mask
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import fft2c, ifft2c

# 64 px at 2 Å: Nyquist 4 Å, box length 128 Å.
BOX, PIX = 64, 2.0


def test_max_res_below_nyquist_keeps_the_box():
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=4.0))
    assert g.work_box == BOX
    assert g.work_pixel_angst == pytest.approx(PIX)


def test_max_res_crops_the_working_box():
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=16.0))
    assert g.work_box < BOX and g.work_box % 2 == 0
    assert g.r_max == pytest.approx(BOX * PIX / 16.0)  # 8 Fourier px
    assert g.work_box >= 2 * g.r_max
    assert g.work_pixel_angst == pytest.approx(PIX * BOX / g.work_box)
    coarser = make_geometry(BOX, PIX, EMConfig(max_res_angst=32.0))
    assert coarser.work_box < g.work_box


def test_max_align_res_sets_r_align():
    default = make_geometry(BOX, PIX, EMConfig(max_res_angst=8.0))
    assert default.r_align == pytest.approx(default.r_max)
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=8.0, max_align_res_angst=16.0))
    assert g.r_align == pytest.approx(BOX * PIX / 16.0)
    assert g.work_box == default.work_box  # the class box is unchanged
    # Never beyond the class-average radius: finer than --max-res is refused, and beyond Nyquist it stops there.
    with pytest.raises(Cryo2DError, match="--max-align-res 8 Å is a higher resolution .* than --max-res 16 Å"):
        EMConfig(max_res_angst=16.0, max_align_res_angst=8.0).validate()
    nyquist = make_geometry(BOX, PIX, EMConfig(max_res_angst=PIX, max_align_res_angst=1.5 * PIX))
    assert nyquist.r_align == pytest.approx(nyquist.r_max)


def test_min_align_res_sets_r_min_align():
    assert make_geometry(BOX, PIX, EMConfig(max_res_angst=8.0)).r_min_align == 1.0
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=8.0, min_align_res_angst=32.0))
    assert g.r_min_align == pytest.approx(BOX * PIX / 32.0)


def test_min_align_res_at_or_above_max_is_an_error():
    with pytest.raises(Cryo2DError, match="min-align-res"):
        EMConfig(max_res_angst=8.0, min_align_res_angst=8.0).validate()
    with pytest.raises(Cryo2DError, match="min-align-res"):
        make_geometry(BOX, PIX, EMConfig(max_res_angst=8.0, max_align_res_angst=20.0, min_align_res_angst=16.0))
    with pytest.raises(Cryo2DError, match="min-align-res"):
        # Only one Fourier px between the two radii.
        make_geometry(BOX, PIX, EMConfig(max_res_angst=8.0, max_align_res_angst=16.0, min_align_res_angst=128 / 7.5))


def test_max_res_coarser_than_the_box_names_the_resolution_not_none():
    """Without --min-align-res the message names --max-res and the box length (found by a fuzz run: it said "None Å")."""
    with pytest.raises(Cryo2DError, match=r"--max-res 1000.0 Å leaves no frequencies .* the box \(") as err:
        make_geometry(BOX, PIX, EMConfig(max_res_angst=1000.0))
    assert "None" not in str(err.value)


def test_tiny_box_is_an_error():
    with pytest.raises(Cryo2DError, match="too small"):
        make_geometry(8, PIX, EMConfig())


def test_mask_radii():
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=4.0, mask_diameter_angst=80.0))
    assert g.mask_inner_px == pytest.approx(20.0)
    assert g.mask_outer_px == pytest.approx(24.0)
    assert g.particle_diameter_angst == 80.0
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=4.0, mask_diameter_angst=80.0, mask_diameter_outer_angst=100.0))
    assert g.mask_outer_px == pytest.approx(25.0)
    with pytest.raises(Cryo2DError):
        make_geometry(BOX, PIX, EMConfig(mask_diameter_angst=80.0, mask_diameter_outer_angst=60.0))


def test_a_mask_wider_than_the_box_leaves_the_particle_the_box():
    """The mask covers the box; the particle diameter (duplicate distance, angular step) is the box's length."""
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=4.0, mask_diameter_angst=1e9))
    assert g.mask_inner_px == pytest.approx(1e9 / 2 / PIX)
    assert g.particle_diameter_angst == pytest.approx(BOX * PIX)


def test_soft_mask_profile():
    m = soft_mask(32, 8.0, 12.0)
    assert float(m[16, 16]) == 1.0 and float(m[16, 16 + 8]) == 1.0
    assert float(m[16, 16 + 12]) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(m[16, 16 + 10]) < 1


def test_disc_points_half_plane():
    full = disc_points(16, 0, 6, half=False)
    half = disc_points(16, 0, 6, half=True)
    assert float(half.weight.sum()) == pytest.approx(len(full))  # half-plane weights cover the disc
    r = half.xy.norm(dim=1)
    assert (r <= 6 + 1e-6).all()
    x, y = half.xy[:, 0], half.xy[:, 1]
    assert ((x > 0) | ((x == 0) & (y >= 0))).all()
    ring = disc_points(16, 3, 6, half=True)
    assert (ring.xy.norm(dim=1) >= 3 - 1e-6).all() and (ring.weight == 2).all()


def test_hermitian_grid_gives_a_real_image():
    g = torch.Generator().manual_seed(0)
    pts = disc_points(16, 0, 7, half=True)
    vals = torch.complex(torch.randn(2, len(pts), generator=g), torch.randn(2, len(pts), generator=g))
    vals[:, (pts.xy == 0).all(dim=1)] = vals[:, (pts.xy == 0).all(dim=1)].real.to(vals.dtype)
    grid = hermitian_grid(vals, pts, 16)
    img = ifft2c(grid)
    assert float(img.imag.abs().max()) < 1e-5 * float(img.real.abs().max())
    # Round trip: the real image's transform has the values at the half-plane points.
    back = fft2c(img.real).flatten(1)[:, pts.flat]
    torch.testing.assert_close(back, vals, atol=1e-4, rtol=1e-4)


def test_outer_mask_smaller_than_the_inner_one_is_an_error_that_names_both():
    with pytest.raises(Cryo2DError, match="--mask-diameter-outer 100 Å must not be smaller than --mask-diameter 150 Å"):
        make_geometry(BOX, PIX, EMConfig(mask_diameter_angst=150.0, mask_diameter_outer_angst=100.0))
    # alone, it is compared with the default inner diameter (the box)
    with pytest.raises(Cryo2DError, match=rf"smaller than the default --mask-diameter \(the box, {BOX * PIX:.1f} Å\): give --mask-diameter too"):
        make_geometry(BOX, PIX, EMConfig(mask_diameter_outer_angst=BOX * PIX - 10))
    g = make_geometry(BOX, PIX, EMConfig(mask_diameter_outer_angst=BOX * PIX + 10))
    assert g.mask_outer_px > g.mask_inner_px


def test_a_mask_of_a_few_pixels_is_an_error_that_says_the_unit():
    """--mask-diameter 1 (Å, at 10 Å/px) masked every image to zero and put all of them in the empty-box class."""
    with pytest.raises(Cryo2DError, match=r"^--mask-diameter 7 Å is 3.5 px at 2.000 Å/px: a mask under 4 px leaves "
                                          r"no particle to classify \(the diameter is in Å\)$"):
        make_geometry(BOX, PIX, EMConfig(mask_diameter_angst=7.0))
    g = make_geometry(BOX, PIX, EMConfig(max_res_angst=4.0, mask_diameter_angst=8.0))  # working px = input px
    assert g.mask_inner_px == pytest.approx(2.0)
