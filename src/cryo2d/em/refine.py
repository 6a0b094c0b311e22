"""Local refinement of final poses: finer angles and shifts around each particle's best grid pose.

The search ranks poses on a grid (angle step ``dpsi``, shift step ``dshift``
of one working pixel or more). Written at the finer resolution of
``Engine.average_pass``, the class averages are blurred by what that grid
leaves: an rms shift error of 0.68 input px keeps 10 % of the signal at
Nyquist (exp(−2π² σ² f²), f = 0.5 cycle/px). Here each particle's pose is
refined over every combination of angle offsets within ±dpsi/2 at dpsi/4 and
shift offsets within ±dshift/2 at dshift/4 in x and y (5 × 25), against its
own class with the E-step's score (DESIGN §2):

    gain(ψ, t) = s · Re Σ_f w(f) / σ²(f) · X(f) e^{2πi f·t} conj(c(f) A_ψ(f))
                 − ½ s² Σ_f w(f) / σ²(f) · c(f)² |A_ψ(f)|²

with X the particle's transform, c its CTF, s its scale, A_ψ the class
rotated by ψ and w the Hermitian weight of a half-plane point.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cryo2d.em.estep import deshift_phases
from cryo2d.em.rotation import rotated_points, sample_half

#: Offsets tried around the grid pose, in grid steps (angle; then shift in x and in y).
STEPS = (-0.5, -0.25, 0.0, 0.25, 0.5)


def refine_poses(
    X: Tensor,
    ctf: Tensor,
    scale: Tensor,
    inv_sigma2: Tensor,
    xy: Tensor,
    box: int,
    classes: Tensor,
    labels: Tensor,
    psi_rad: Tensor,
    shifts_px: Tensor,
    dpsi_rad: float,
    dshift_px: float,
    zeropad: int,
    max_shift_px: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Angles and shifts refined around the given poses (module docstring).

    Parameters
    ----------
    X : (b, m) complex tensor
        The particles' transforms at the points ``xy``.
    ctf : (b, m) float tensor
        Their CTFs at the points.
    scale : (b,) float tensor
        Per-particle scale.
    inv_sigma2 : (m,) float tensor
        w(f) / σ²(f) at the points.
    xy : (m, 2) float tensor
        Frequencies, Fourier px of a ``box`` grid (a half-plane set).
    box : int
        Edge of that grid, px.
    classes : (K, 2, p, p//2 + 1) float tensor
        The classes oversampled by ``zeropad`` (:func:`~cryo2d.em.rotation.oversample`).
    labels : (b,) int64 tensor
        Each particle's class.
    psi_rad : (b,) float tensor
        Grid angles, radians (the particle is its class rotated by ψ).
    shifts_px : (b, 2) float tensor
        Grid shifts (x, y), px of the ``box`` grid (undone by ``deshift_phases``).
    dpsi_rad, dshift_px : float
        The grid's angle and shift steps.
    zeropad : int
    max_shift_px : float, optional
        Radius of the search's shifts: no refined shift leaves that disc.

    Returns
    -------
    psi_rad : (b,) float tensor, shifts_px : (b, 2) float tensor
        The refined poses (a particle keeps its pose when no offset scores higher).
    """
    dev = X.device
    steps = torch.tensor(STEPS, device=dev)
    freq = xy / box
    angles = psi_rad[:, None] + dpsi_rad * steps[None, :]  # (b, a)
    Y, model = _at_poses(X, ctf, scale, xy, box, classes, labels, angles, shifts_px, zeropad)
    dt = torch.cartesian_prod(steps, steps) * dshift_px  # (T, 2) shift offsets (x, y)
    # Every (angle, shift offset) pair: an angle's best shift moves with it for off-centre density.
    cross = ((Y[:, None, :] * model.conj() * inv_sigma2) @ deshift_phases(freq, dt).T).real  # (b, a, T)
    gain = cross - 0.5 * (model.abs().square() @ inv_sigma2)[:, :, None]
    if max_shift_px is not None:
        outside = (shifts_px[:, None, :] + dt[None]).norm(dim=-1) > max_shift_px + 1e-6  # (b, T)
        outside &= dt.norm(dim=1)[None] > 0  # the grid pose itself always stays a choice
        gain = gain.masked_fill(outside[:, None, :], -torch.inf)
    best = gain.flatten(1).argmax(dim=1)
    best_a, best_t = best // len(dt), best % len(dt)
    rows = torch.arange(len(X), device=dev)
    return angles[rows, best_a], shifts_px + dt[best_t]


def pose_gain(
    X: Tensor,
    ctf: Tensor,
    scale: Tensor,
    inv_sigma2: Tensor,
    xy: Tensor,
    box: int,
    classes: Tensor,
    labels: Tensor,
    psi_rad: Tensor,
    shifts_px: Tensor,
    zeropad: int,
) -> Tensor:
    """The E-step's gain (module docstring) of each particle at one pose: its class, angle and shift.

    Parameters are those of :func:`refine_poses` (``psi_rad`` and ``shifts_px`` are the pose).

    Returns
    -------
    (b,) float tensor
        s·C − s²·N / 2 at the pose, before the temperature.
    """
    Y, model = _at_poses(X, ctf, scale, xy, box, classes, labels, psi_rad[:, None], shifts_px, zeropad)
    model = model[:, 0]
    return (Y * model.conj() * inv_sigma2).sum(dim=1).real - 0.5 * (model.abs().square() * inv_sigma2).sum(dim=1)


def _at_poses(X: Tensor, ctf: Tensor, scale: Tensor, xy: Tensor, box: int, classes: Tensor, labels: Tensor,
              angles: Tensor, shifts_px: Tensor, zeropad: int) -> tuple[Tensor, Tensor]:
    """The particles de-shifted by ``shifts_px`` (b, m), and their models s·c·A_ψ at ``angles`` (b, a), (b, a, m)."""
    Y = X * deshift_phases(xy / box, shifts_px.float())  # one row per particle
    pts = rotated_points(xy, -angles.flatten()).view(*angles.shape, -1, 2)  # (b, a, m, 2)
    Z = sample_half(classes[labels], pts, zeropad)  # (b, 2, a, m)
    return Y, (scale[:, None] * ctf)[:, None, :] * torch.complex(Z[:, 0], Z[:, 1])
