"""Local refinement of final poses (cryo2d.em.refine): finer angles and shifts than the search grid."""
from __future__ import annotations

import math

import numpy as np
import torch

from cryo2d.em.geometry import disc_points
from cryo2d.em.refine import refine_poses
from cryo2d.em.rotation import oversample
from cryo2d.fourier import fft2c

BOX = 32


def blobs(psi_deg: float, shift_xy=(0.0, 0.0), box: int = BOX) -> torch.Tensor:
    """Two Gaussian blobs rotated exactly (counter-clockwise about pixel box//2) by ψ, then moved by (x, y) px."""
    k = torch.arange(box, dtype=torch.float64) - box // 2
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    xx, yy = xx - shift_xy[0], yy - shift_xy[1]
    a = math.radians(psi_deg)
    x = math.cos(a) * xx + math.sin(a) * yy
    y = -math.sin(a) * xx + math.cos(a) * yy
    return (torch.exp(-((x - 4) ** 2 + (y + 2) ** 2) / 6) + 0.6 * torch.exp(-((x + 3) ** 2 + (y - 5) ** 2) / 10)).float()


def _angle_error_deg(a_rad: torch.Tensor, b_deg: np.ndarray) -> np.ndarray:
    d = np.degrees(a_rad.numpy()) - b_deg
    return np.abs((d + 180.0) % 360.0 - 180.0)


def test_refinement_moves_grid_poses_to_the_true_ones():
    """Noise-free particles at exact angles and sub-pixel shifts; the grid poses start up to 0.45 steps away."""
    rng = np.random.default_rng(0)
    b, dpsi_deg, dshift = 8, 6.0, 1.0
    psi_true = rng.uniform(0, 360, b)
    t_true = rng.uniform(-3, 3, (b, 2))
    pts = disc_points(BOX, 1.0, 12.0, half=True)
    X = torch.stack([fft2c(blobs(p, t)[None])[0].flatten()[pts.flat] for p, t in zip(psi_true, t_true)])
    psi0 = psi_true + rng.uniform(-0.45, 0.45, b) * dpsi_deg
    t0 = t_true + rng.uniform(-0.45, 0.45, (b, 2)) * dshift
    classes = oversample(fft2c(blobs(0.0)[None]), 2)
    psi, shifts = refine_poses(
        X, torch.ones(b, len(pts)), torch.ones(b), pts.weight, pts.xy, BOX, classes, torch.zeros(b, dtype=torch.long),
        torch.from_numpy(np.radians(psi0)).float(), torch.from_numpy(t0).float(), math.radians(dpsi_deg), dshift, 2,
    )
    angle_before, angle_after = _angle_error_deg(torch.from_numpy(np.radians(psi0)), psi_true), _angle_error_deg(psi, psi_true)
    shift_before, shift_after = np.abs(t0 - t_true), np.abs(shifts.numpy() - t_true)
    # The finer grid is a quarter step; an angle and a shift can trade off a little (off-centre density).
    assert angle_after.max() <= dpsi_deg / 4, angle_after
    assert shift_after.max() <= dshift / 4, shift_after
    assert angle_before.max() > dpsi_deg / 3 and shift_before.max() > dshift / 3  # where the grid left them
    assert shift_after.mean() < 0.5 * shift_before.mean()


def test_a_particle_already_at_its_pose_keeps_it():
    pts = disc_points(BOX, 1.0, 12.0, half=True)
    X = fft2c(blobs(30.0, (1.0, -2.0))[None])[0].flatten()[pts.flat][None]
    classes = oversample(fft2c(blobs(0.0)[None]), 2)
    psi, shifts = refine_poses(X, torch.ones(1, len(pts)), torch.ones(1), pts.weight, pts.xy, BOX, classes,
                               torch.zeros(1, dtype=torch.long), torch.tensor([math.radians(30.0)]),
                               torch.tensor([[1.0, -2.0]]), math.radians(6.0), 1.0, 2)
    assert abs(math.degrees(float(psi[0])) - 30.0) < 1e-4
    torch.testing.assert_close(shifts, torch.tensor([[1.0, -2.0]]))


def test_refined_shifts_stay_within_the_search_range():
    """A particle 0.4 px beyond a search range of 1 px: its shift may not follow it out of the disc."""
    pts = disc_points(BOX, 1.0, 12.0, half=True)
    X = fft2c(blobs(0.0, (1.4, 0.0))[None])[0].flatten()[pts.flat][None]
    classes = oversample(fft2c(blobs(0.0)[None]), 2)
    args = (X, torch.ones(1, len(pts)), torch.ones(1), pts.weight, pts.xy, BOX, classes, torch.zeros(1, dtype=torch.long),
            torch.zeros(1), torch.tensor([[1.0, 0.0]]), math.radians(6.0), 1.0, 2)
    _, free = refine_poses(*args)
    assert float(free[0, 0]) == 1.5  # unbounded it moves half a step towards the truth
    _, bounded = refine_poses(*args, max_shift_px=1.0)
    assert float(bounded[0].norm()) <= 1.0 + 1e-6
    _, none = refine_poses(*args[:9], torch.zeros(1, 2), *args[10:], max_shift_px=0.0)
    assert float(none.abs().max()) == 0.0  # --shift-range 0: no shifts at all
