"""Fourier-space rotation of classes (zero-padded oversampling, gridding correction)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from cryo2d.em.geometry import disc_points, hermitian_grid
from cryo2d.em.rotation import (
    RotationTable,
    half_plane,
    half_turn_pairs,
    oversample,
    oversample_half,
    psi_grid,
    quarter_turns,
    rotate_classes,
    rotated_points,
    sample_half,
)
from cryo2d.fourier import fft2c, rotate_images

BOX = 32


def analytic_blobs(psi_deg: float = 0.0, box: int = BOX) -> torch.Tensor:
    """Two Gaussian blobs rotated exactly (counter-clockwise, about pixel box//2) by ψ."""
    k = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    a = math.radians(psi_deg)
    x = math.cos(a) * xx + math.sin(a) * yy
    y = -math.sin(a) * xx + math.cos(a) * yy
    img = torch.exp(-((x - 4) ** 2 + (y + 2) ** 2) / 6) + 0.6 * torch.exp(-((x + 3) ** 2 + (y - 5) ** 2) / 10)
    return img.float()


def rotation_error(psi_deg: float, zeropad: int) -> float:
    """Relative error of rotate_classes against the exact rotated transform (radius ≤ 10)."""
    pts = disc_points(BOX, 0, 10, half=False)
    got = rotate_classes(fft2c(analytic_blobs()[None]), pts.xy, torch.tensor([math.radians(psi_deg)]), zeropad)[0, 0]
    want = fft2c(analytic_blobs(psi_deg)[None]).flatten(1)[0, pts.flat]
    return float((got - want).norm() / want.norm())


def test_analytic_rotation_matches_rotate_images_at_90():
    """The exact reference rotates like cryo2d.fourier.rotate_images (about pixel box//2)."""
    exact = analytic_blobs(90.0)
    grid = rotate_images(analytic_blobs()[None], torch.tensor([90.0]))[0]
    torch.testing.assert_close(grid, exact, atol=1e-5, rtol=0)


def test_rotate_classes_90_deg_matches_rotate_images():
    pts = disc_points(BOX, 0, 10, half=False)
    img = analytic_blobs()
    got = rotate_classes(fft2c(img[None]), pts.xy, torch.tensor([math.pi / 2]), 2)[0, 0]
    want = fft2c(rotate_images(img[None], torch.tensor([90.0]))).flatten(1)[0, pts.flat]
    # At grid points only the sinc² gridding correction separates the two.
    assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("psi_deg", [90.0, 37.0, 13.0])
def test_zeropad_two_interpolates_better_than_one(psi_deg):
    e1, e2 = rotation_error(psi_deg, 1), rotation_error(psi_deg, 2)
    assert e2 < 0.05
    assert e2 < 0.5 * e1


def test_zero_angle_is_identity_up_to_gridding():
    assert rotation_error(0.0, 2) < 0.05


def test_rotated_points_counter_clockwise():
    out = rotated_points(torch.tensor([[1.0, 0.0]]), torch.tensor([math.pi / 2]))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]]]), atol=1e-6, rtol=0)


# A step that does not divide 360° becomes the next finer one that does, never a coarser one.
@pytest.mark.parametrize("step,n", [(30.0, 12), (7.5, 48), (1.0, 360), (180.0, 2), (150.0, 3), (100.0, 4),
                                    (50.0, 8), (7.0, 52)])
def test_psi_grid(step, n):
    psi = psi_grid(step)
    assert len(psi) == n
    assert float(psi[0]) == 0.0
    assert math.degrees(float(psi[1] - psi[0])) == pytest.approx(360 / n, rel=1e-5) if n > 1 else True
    assert float(psi[-1]) < 2 * math.pi


@pytest.mark.parametrize("box,zeropad", [(32, 2), (33, 1), (33, 2), (30, 3), (31, 3)])
def test_half_plane_oversampling_matches_full_grid_interpolation(box, zeropad):
    """sample_half(oversample(F)) = bilinear interpolation of the full oversampled transform.

    Reference in float64 with numpy: the image divided by the sinc² gridding
    correction, zero-padded about its centre (an even box's row and column at
    offset −box/2 split between −box/2 and +box/2), full centred FFT, then
    scipy's linear interpolation at the rotated points of a disc.
    """
    rng = np.random.default_rng(box + zeropad)
    c, p = box // 2, zeropad * box
    k = np.arange(box) - c
    disc = np.hypot(k[:, None], k[None, :]) <= box / 2 - 1
    F = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(rng.standard_normal((box, box))))) * disc
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(F))).real
    corr = np.sinc(k / p)
    padded = np.zeros((p, p))
    lo = p // 2 - c
    padded[lo : lo + box, lo : lo + box] = img / (corr[:, None] ** 2 * corr[None, :] ** 2)
    if box % 2 == 0 and p > box:  # the even box's edge row and column, at offset −box/2, split with +box/2
        padded[lo] *= 0.5
        padded[lo + box] = padded[lo]
        padded[:, lo] *= 0.5
        padded[:, lo + box] = padded[:, lo]
    G = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(padded)))
    xy = np.argwhere(disc)[:, ::-1] - c  # (x, y) of the disc's points
    pts = rotated_points(torch.from_numpy(xy).float(), torch.tensor([0.4, 2.9, 4.6]))
    rows, cols = pts[..., 1].double().numpy() * zeropad + p // 2, pts[..., 0].double().numpy() * zeropad + p // 2
    want = map_coordinates(G.real, [rows, cols], order=1) + 1j * map_coordinates(G.imag, [rows, cols], order=1)
    got = sample_half(oversample(torch.from_numpy(F).to(torch.complex64)[None], zeropad), pts, zeropad)[0]
    got = torch.complex(got[0], got[1]).numpy().astype(np.complex128)
    assert oversample(torch.zeros((1, box, box), dtype=torch.complex64), zeropad).shape == (1, 2, p, p // 2 + 1)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("box,r_lo", [(32, 0), (33, 0), (30, 2)])
def test_half_plane_of_point_values_is_oversamples_input(box, r_lo):
    """oversample_half(half_plane(v)) gives oversample(hermitian_grid(v))'s bits: the M-step's sums need not
    be spread on the full grid first (the origin and the x = 0 axis, whose mirrors lie in the half, included)."""
    g = torch.Generator().manual_seed(box)
    pts = disc_points(box, r_lo, box / 2 - 1, half=True)
    values = torch.complex(torch.randn(4, len(pts), generator=g), torch.randn(4, len(pts), generator=g))
    values[:, (pts.xy == 0).all(dim=1)] = values[:, (pts.xy == 0).all(dim=1)].real.to(values.dtype)  # a real origin
    H = half_plane(values, pts, box)
    assert H.shape == (4, box, box // 2 + 1)
    for zeropad in (1, 2):
        assert torch.equal(oversample_half(H, zeropad), oversample(hermitian_grid(values, pts, box), zeropad))


@pytest.mark.parametrize("zeropad", [1, 2, 3])
def test_rotation_table_rows_are_the_rotated_classes(zeropad):
    """Any (class, rotation) rows of a RotationTable, at any index shape, are exactly rotate_classes' rows."""
    g = torch.Generator().manual_seed(0)
    A = fft2c(torch.randn(4, BOX, BOX, generator=g))
    A[:, 0, :] = 0  # no Nyquist row or column (oversample's requirement)
    A[:, :, 0] = 0
    pts = disc_points(BOX, 0, BOX / 2 - 1, half=True)
    psi = psi_grid(7.5)
    want = rotate_classes(A, pts.xy, psi, zeropad).reshape(4 * len(psi), len(pts))
    kr = torch.randint(0, 3 * len(psi), (3, 50), generator=g)  # class 3 unused, repeats
    for n_dense in (0, 2, 4):  # sampled, half made once, all made once
        table = RotationTable(A, pts.xy, psi, zeropad, n_dense)
        assert table.shape == (4, len(psi), len(pts))
        got = table.rows(kr)
        assert got.shape == (3, 50, len(pts))
        assert torch.equal(got, want[kr]), n_dense


def test_half_turn_rows_are_the_conjugates_of_the_first_half_and_match_sampling_them():
    """On a grid of half-turn pairs rows r + R/2 are conj(rows r) exactly (table and dense alike), and equal to
    sampling those angles directly to float rounding; odd, partial or uneven grids are sampled row by row."""
    g = torch.Generator().manual_seed(1)
    A = fft2c(torch.randn(4, BOX, BOX, generator=g))
    A[:, 0, :] = 0
    A[:, :, 0] = 0
    pts = disc_points(BOX, 0, BOX / 2 - 1, half=True)
    psi = psi_grid(10.0)  # 36 angles
    assert half_turn_pairs(psi) and half_turn_pairs(psi_grid(2.5))
    assert not half_turn_pairs(psi_grid(8.0))  # 45 angles
    assert not half_turn_pairs(psi[18:]) and not half_turn_pairs(psi[:1])  # 180° … 350°; one angle
    assert not half_turn_pairs(torch.tensor([0.0, 0.1, math.pi, math.pi + 0.2]))
    Z = rotate_classes(A, pts.xy, psi, 2)
    assert torch.equal(Z[:, 18:], Z[:, :18].conj())
    direct = rotate_classes(A, pts.xy, psi[18:], 2)  # not pairs: sampled at 180° … 350°
    torch.testing.assert_close(Z[:, 18:], direct, rtol=0, atol=2e-5 * float(direct.abs().max()))
    assert float((Z[:, 18:] - direct).abs().max()) > 0  # the rotated points do round differently
    table = RotationTable(A, pts.xy, psi, 2, 2)  # classes 0-1 made once, 2-3 sampled on demand
    assert table.sampled == 18
    assert torch.equal(table.rows(torch.arange(4 * 36)), Z.reshape(4 * 36, -1))


@pytest.mark.parametrize("box", [32, 33])
def test_quarter_turns_move_point_values_exactly_and_commute_with_oversampling(box):
    """``quarter_turns``: T_q(f) = S(R(q·π/2) f) is the transform of the image turned by q quarter turns (exact),
    and the oversampled grid turns with it: T_q's interpolated at g equals S's at R(q·π/2) g, for even and odd boxes
    (an even box's edge row and column are split between ±box/2, so the padding has no favoured side)."""
    rng = np.random.default_rng(box)
    pts = disc_points(box, 0, box / 2 - 1, half=True)
    x, y = pts.xy[:, 0].long().numpy(), pts.xy[:, 1].long().numpy()
    img0 = rng.standard_normal((box, box))  # origin at index [0, 0]
    values = lambda a: np.fft.fft2(a)[y % box, x % box]  # noqa: E731  (transform at the points)
    v = values(img0)
    src, conj = quarter_turns(pts, box)
    assert torch.equal(src[0], torch.arange(len(pts))) and not bool(conj[0].any())
    k = np.arange(box)
    turned = img0
    for q in range(1, 4):
        turned = turned[np.ix_(k, (-k) % box)].T  # img(R(π/2) u): [row y, col x] = img[row x, col −y]
        got = v[src[q].numpy()]
        got = np.where(conj[q].numpy(), got.conj(), got)
        np.testing.assert_allclose(got, values(turned), atol=1e-9 * np.abs(v).max())
    S = torch.from_numpy(v).to(torch.complex64)[None]
    G = oversample(hermitian_grid(S, pts, box), 2)
    at = rotated_points(pts.xy, torch.tensor([0.3, 1.1, 2.0]))  # (3, m, 2)
    for q in range(1, 4):
        T = torch.where(conj[q], S[:, src[q]].conj(), S[:, src[q]])
        GT = oversample(hermitian_grid(T, pts, box), 2)
        turned_at = rotated_points(at.reshape(-1, 2), torch.tensor([q * math.pi / 2]))[0].reshape(at.shape)
        np.testing.assert_allclose(sample_half(GT, at, 2).numpy(), sample_half(G, turned_at, 2).numpy(),
                                   atol=1e-5 * float(G.abs().max()))
