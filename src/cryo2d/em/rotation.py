"""In-plane rotation of classes in Fourier space with zero-padded oversampling.

A class image rotated by ψ has the transform A(R(−ψ) f). We sample centred
transforms at rotated frequencies by bilinear interpolation on a grid
oversampled ``zeropad`` times (the class is zero-padded in real space to
``zeropad × work_box`` before its FFT), after dividing the image by the
real-space apodisation that linear interpolation causes (sinc², the usual
gridding correction). ``zeropad = 1`` skips the padding: less memory, more
interpolation error. :class:`RotationTable` gives the same rotated rows on
demand, for passes whose K · R · M references would not fit their budget.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import Tensor

from cryo2d.em.geometry import PointSet


def _gridding_correction(box: int, padded: int, device) -> Tensor:
    """(box, box) sinc² apodisation of linear interpolation on a ``padded`` grid."""
    x = (torch.arange(box, device=device, dtype=torch.float64) - box // 2) / padded
    s = torch.special.sinc(x)
    return (s[:, None] ** 2 * s[None, :] ** 2).float()


def oversample(F: Tensor, zeropad: int) -> Tensor:
    """Oversample centred transforms of real images for interpolation (half plane x ≥ 0).

    The image is zero-padded in real space and transformed with real FFTs;
    only the x ≥ 0 half of the oversampled transform is kept, the rest
    follows from F(−f) = conj F(f) (:func:`sample_half` mirrors the points).
    Real FFTs and no ``fftshift`` copies along x: 1,300 grids of 64 px,
    ``zeropad = 2``, 0.49 → 0.12 s on 2 threads (benchmarks/README.md).

    Parameters
    ----------
    F : (n, b, b) complex tensor
        Centred, Hermitian transforms (zero frequency at [b//2, b//2]) of
        real images; the Nyquist row and column (if any) must be zero.
    zeropad : int
        Oversampling factor (≥ 1).

    Returns
    -------
    (n, 2, p, p//2 + 1) float tensor, p = zeropad · b
        Real and imaginary parts of the oversampled transform: element
        [j, i] holds frequency (x, y) = (i, j − p//2) / zeropad. A view of
        the complex transform (channels-last strides): ``grid_sample`` reads
        it as it is, and copying it to planes took longer than the FFT (the
        M-step's back-rotation of a 96 px pass, K = 30: 443 -> 292 ms).
    """
    b, c = F.shape[-1], F.shape[-1] // 2
    # Columns x = 0 … b//2 (for even b the Nyquist column x = −b/2 stands for
    # +b/2), rows moved to origin 0; the image comes out with its origin at
    # index 0 and stays so (no shift back to the centre).
    half = F[..., c:] if b % 2 else torch.cat([F[..., c:], F[..., :1]], dim=-1)
    return oversample_half(torch.fft.ifftshift(half, dim=-2), zeropad)


def half_plane(values: Tensor, points: PointSet, work_box: int) -> Tensor:
    """The x ≥ 0 half of the transforms whose values at half-plane ``points`` are given, as
    :func:`oversample_half` takes it (the rows that :func:`oversample` passes it, without the full grid).

    Parameters
    ----------
    values : (n, m) complex tensor
        Values at ``points`` (a half-plane set inside the Nyquist circle);
        −f holds the conjugate of f.
    points : PointSet
    work_box : int

    Returns
    -------
    (n, b, b//2 + 1) complex tensor, b = ``work_box``: element [j, i] holds
    frequency (x, y) = (i, j) with y taken modulo b; zero elsewhere. The same
    values as ``hermitian_grid`` followed by :func:`oversample`'s reordering.
    """
    b, w = work_box, work_box // 2 + 1
    x, y = points.xy[:, 0].long(), points.xy[:, 1].long()
    out = torch.zeros((values.shape[0], b * w), dtype=values.dtype, device=values.device)
    axis = torch.nonzero(x == 0).squeeze(1)  # their mirrors (0, −y) lie in the half too
    out.index_copy_(1, ((-y[axis]) % b) * w, values[:, axis].conj())  # first: a point's own value wins
    out.index_copy_(1, (y % b) * w + x, values)
    return out.view(-1, b, w)


def oversample_half(H: Tensor, zeropad: int) -> Tensor:
    """:func:`oversample` from the x ≥ 0 half of the transforms, rows from origin 0 (:func:`half_plane`).

    ``H`` is (n, b, b//2 + 1) complex, element [j, i] frequency (i, j mod b)
    (for even b column b//2 is the Nyquist column); returns what
    :func:`oversample` returns.

    For even b the image's row and column at offset −b/2 are split in halves
    between −b/2 and +b/2 when padded, so that the padded image, and the
    oversampled transform, turn exactly with the input under quarter turns
    (:func:`quarter_turns`; the M-step back-rotates four rows a quarter turn
    apart at once). Placed at −b/2 alone, that row adds its full value, not
    zero, at the half-integer frequencies: back-rotated averages of noisy
    images (40 px) had a 2-4 % larger squared error in shells 6-18.
    """
    n, b = H.shape[0], H.shape[1]
    p, c = zeropad * b, b // 2
    img = torch.fft.irfft2(H, s=(b, b))
    weight = 1.0 / torch.fft.ifftshift(_gridding_correction(b, p, H.device), dim=(-2, -1))
    if p % 2 == 0:  # (−1)^y on the rows centres the rows of the transform
        k = torch.arange(b, device=H.device)
        weight = weight * (1 - 2 * ((k - b * (k >= b - c).long()) % 2)).float()[:, None]
    img = img * weight
    if p != b:  # zero-pad around the origin: offsets −c … b−1−c keep their place mod p
        padded = img.new_zeros((n, p, p))
        hi = b - c
        padded[:, :hi, :hi] = img[:, :hi, :hi]
        padded[:, :hi, p - c :] = img[:, :hi, hi:]
        padded[:, p - c :, :hi] = img[:, hi:, :hi]
        padded[:, p - c :, p - c :] = img[:, hi:, hi:]
        if b % 2 == 0:  # the row and column at offset −b/2 stand for +b/2 as much: split them between the two
            padded[:, p - c] *= 0.5
            padded[:, c] = padded[:, p - c]
            padded[:, :, p - c] *= 0.5
            padded[:, :, c] = padded[:, :, p - c]
        img = padded
    G = torch.fft.rfft2(img)
    if p % 2:
        G = torch.fft.fftshift(G, dim=-2)
    return torch.view_as_real(G).permute(0, 3, 1, 2)  # (n, 2, p, p//2 + 1), channels-last strides


def rotated_points(xy: Tensor, angles_rad: Tensor) -> Tensor:
    """Points ``xy`` rotated counter-clockwise by each angle.

    Parameters
    ----------
    xy : (m, 2) float tensor
        (x, y) coordinates.
    angles_rad : (r,) float tensor
        Rotation angles, radians.

    Returns
    -------
    (r, m, 2) float tensor
    """
    c = torch.cos(angles_rad)[:, None]
    s = torch.sin(angles_rad)[:, None]
    x, y = xy[:, 0][None], xy[:, 1][None]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def sample_grid(G: Tensor, points: Tensor, zeropad: int) -> Tensor:
    """Bilinear samples of full centred grids at frequency points.

    Parameters
    ----------
    G : (n, c, p, p) float tensor
        ``c`` channels of centred grids with oversampling ``zeropad`` (e.g. a
        real CTF² sum with ``zeropad = 1``; :func:`sample_half` samples what
        :func:`oversample` returns).
    points : (n, r, m, 2) or (r, m, 2) float tensor
        (x, y) frequencies in Fourier px of the un-oversampled grid; the same
        points for every grid when 3-D.
    zeropad : int

    Returns
    -------
    (n, c, r, m) float tensor; zero outside the grid.
    """
    n, _, p, _ = G.shape
    if points.ndim == 3:
        points = points.unsqueeze(0).expand(n, -1, -1, -1)
    scale = 2.0 / (p - 1)
    grid = (points * zeropad + p // 2) * scale - 1.0
    return nnf.grid_sample(G, grid.to(G.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


_BILINEAR = dict(mode="bilinear", padding_mode="zeros", align_corners=True)


def _half_grid(points: Tensor, p: int, zeropad: int) -> tuple[Tensor, Tensor]:
    """``grid_sample`` coordinates on a (p, p//2 + 1) half-plane grid of frequency ``points`` (..., 2),
    and where a point was mirrored to x ≥ 0 (its sample is then conjugated).

    In-place steps on one tensor (the same values as mirroring, scaling and shifting each
    coordinate apart; half the time)."""
    w = p // 2 + 1
    flip = points[..., 0] < 0
    factor = torch.where(flip, -float(zeropad), float(zeropad)).to(points.dtype)
    shift = torch.tensor([0.0, float(p // 2)], dtype=points.dtype, device=points.device)
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (p - 1)], dtype=points.dtype, device=points.device)
    return (points * factor.unsqueeze(-1)).add_(shift).mul_(scale).sub_(1.0), flip


def sample_half(G: Tensor, points: Tensor, zeropad: int) -> Tensor:
    """Bilinear samples of half-plane oversampled transforms (from :func:`oversample`).

    A point with x < 0 is sampled at −f and conjugated (transforms of real
    images), which is what bilinear interpolation on the full grid gives.

    Parameters
    ----------
    G : (n, 2, p, p//2 + 1) float tensor
        Real and imaginary parts, as :func:`oversample` returns them.
    points, zeropad :
        As for :func:`sample_grid`.

    Returns
    -------
    (n, 2, r, m) float tensor: real and imaginary parts; zero outside the grid.
    """
    n = G.shape[0]
    grid, flip = _half_grid(points, G.shape[-2], zeropad)
    if grid.ndim == 3:
        grid, flip = grid.unsqueeze(0).expand(n, -1, -1, -1), flip.unsqueeze(0)
    out = nnf.grid_sample(G, grid.to(G.dtype), **_BILINEAR)
    out[:, 1] = torch.where(flip, -out[:, 1], out[:, 1])
    return out


def rotate_classes(A: Tensor, xy: Tensor, psi_rad: Tensor, zeropad: int) -> Tensor:
    """Transforms of the classes rotated by each ψ, at the points ``xy``.

    Parameters
    ----------
    A : (k, b, b) complex tensor
        Centred transforms of the class images.
    xy : (m, 2) float tensor
        Frequencies (Fourier px) where the rotated transforms are wanted.
    psi_rad : (r,) float tensor
        In-plane angles: the output is the transform of the class rotated
        counter-clockwise by ψ, i.e. A(R(−ψ) f).
    zeropad : int

    Returns
    -------
    (k, r, m) complex tensor

    On a grid of half-turn pairs (:func:`half_turn_pairs`) rows r + R/2 are
    the conjugates of rows r (A(−g) = conj A(g) for a real image; sampling
    −g is mirroring g and conjugating, so only rounding in the rotated points
    differs): only the first half is sampled.
    """
    G = oversample(A, zeropad)
    half = half_turn_pairs(psi_rad)
    angles = psi_rad[: len(psi_rad) // 2] if half else psi_rad
    out = sample_half(G, rotated_points(xy, -angles), zeropad)
    Z = torch.complex(out[:, 0], out[:, 1])
    return torch.cat([Z, Z.conj()], dim=1) if half else Z


def half_turn_pairs(psi_rad: Tensor) -> bool:
    """Whether the R angles come in half-turn pairs: R even and ψ[r + R/2] = ψ[r] + π (mod 2π, to 1e-5 rad).

    Then the rows r + R/2 of rotated transforms of real images are the
    conjugates of rows r, and have the same power: :func:`rotate_classes`
    and :class:`RotationTable` sample the first half only, and the E-step
    takes the norms of the first half (``refs_power`` of R/2 rows).
    Every grid of :func:`psi_grid` with an even number of angles qualifies.
    """
    return turns_apart(psi_rad, 2)


def wrapped(angle_rad: Tensor) -> Tensor:
    """Angles (radians) brought into [−π, π): differences of angles compared modulo a full turn."""
    return torch.remainder(angle_rad + math.pi, 2 * math.pi) - math.pi


def turns_apart(psi_rad: Tensor, n: int) -> bool:
    """Whether R is divisible by ``n`` and ψ[r + R/n] = ψ[r] + 2π/n for every r < R − R/n (mod 2π, to 1e-5 rad):
    the angles come in groups of ``n`` a 1/n turn apart (n = 2: :func:`half_turn_pairs`; n = 4: quarter turns)."""
    R = len(psi_rad)
    if R < n or R % n:
        return False
    psi = psi_rad.double()
    return bool(wrapped(psi[R // n :] - psi[: R - R // n] - 2 * math.pi / n).abs().max() < 1e-5)


def unrotate_sums(S: Tensor, Q: Tensor, psi_rad: Tensor, xy: Tensor, zeropad: int) -> tuple[Tensor, Tensor]:
    """Bring sums accumulated in rotated frames back to the class frame.

    Parameters
    ----------
    S : (c, b, b//2 + 1) complex tensor
        Sums of CTF-weighted, de-shifted images, one per (class, angle)
        combination, in the frame of particles at angle ``psi_rad[c]``: the
        x ≥ 0 half of their transforms (:func:`half_plane`).
    Q : (c, b, b) float tensor
        Matching sums of CTF² (real, symmetric): interpolated directly.
    psi_rad : (c,) float tensor
        Angle of each combination.
    xy : (m, 2) float tensor
        Class-frame frequencies where the sums are wanted.
    zeropad : int

    Returns
    -------
    (c, m) complex tensor and (c, m) float tensor
        S(R(ψ) g) and Q(R(ψ) g) for each class-frame frequency g.
    """
    pts = rotated_points(xy, psi_rad).unsqueeze(1)  # (c, 1, m, 2)
    G = oversample_half(S, zeropad)
    s_out = sample_half(G, pts, zeropad)[:, :, 0]
    q_out = sample_grid(Q.unsqueeze(1), pts, 1)[:, 0, 0]
    return torch.complex(s_out[:, 0], s_out[:, 1]), q_out


def quarter_turns(points: PointSet, work_box: int) -> tuple[Tensor, Tensor] | None:
    """Where the values of half-plane transforms go under quarter turns of the frequency plane.

    For a transform S given at half-plane ``points`` (a set closed under
    quarter turns up to the Hermitian mirror, e.g. a disc), the transform
    turned by q quarter turns, T_q(f) = S(R(q·π/2) f), has at point i the
    value ``S[..., src[q, i]]``, conjugated where ``conj[q, i]`` (when
    R(q·π/2) f falls in the other half plane). Exact: it moves values between
    grid points, with no interpolation.

    Parameters
    ----------
    points : PointSet
        Half-plane points (``disc_points(..., half=True)``).
    work_box : int

    Returns
    -------
    src : (4, m) int64 tensor, conj : (4, m) bool tensor
        Row q for q quarter turns (row 0: the identity); None if some turned
        point is not in the set.
    """
    c = work_box // 2
    x, y = points.xy[:, 0].long(), points.xy[:, 1].long()
    m, dev = len(points), points.xy.device
    at = torch.full((work_box * work_box,), -1, dtype=torch.long, device=dev)
    mirrored = torch.zeros(work_box * work_box, dtype=torch.bool, device=dev)
    i, mirror = torch.arange(m, device=dev), (c - y) * work_box + (c - x)
    at[mirror] = i  # the mirrors first: a point that is its own mirror (the origin) keeps itself
    mirrored[mirror] = True
    at[points.flat] = i
    mirrored[points.flat] = False
    src, conj = [], []
    for tx, ty in ((x, y), (-y, x), (-x, -y), (y, -x)):  # R(q·π/2) f, q = 0 … 3
        inside = (tx + c >= 0) & (tx + c < work_box) & (ty + c >= 0) & (ty + c < work_box)
        if not bool(inside.all()):
            return None
        flat = (ty + c) * work_box + (tx + c)
        if bool((at[flat] < 0).any()):
            return None
        src.append(at[flat])
        conj.append(mirrored[flat])
    return torch.stack(src), torch.stack(conj)


def psi_grid(step_deg: float, device=None) -> Tensor:
    """Angles 0, step, 2·step, … < 360°, in radians, as a float32 tensor.

    The step used divides 360° and is never coarser than ``step_deg``: the
    smallest whole number of angles with a step at most ``step_deg`` (7° → 52
    angles of 6.92°; the automatic steps divide 360° as they are).
    """
    n = max(1, math.ceil(360.0 / step_deg - 1e-9))
    return torch.arange(n, device=device, dtype=torch.float64).mul(2 * math.pi / n).float()


#: Rotated-reference values made or handed out at a time by :class:`RotationTable` and its users (128 MB).
TABLE_GROUP_VALUES = 1 << 24


class RotationTable:
    """Rotated class transforms sampled on demand: the E-step's references without their K · R · M array.

    Holds the rows of the first ``n_dense`` classes, as
    ``rotate_classes(A, xy, psi_rad, zeropad)`` makes them, and for the
    other classes their oversampled grids (p · (p//2 + 1) complex values
    each) and the sampling grid of every rotation (R · M points), so that
    :meth:`rows` gives any (class, rotation) rows of ``rotate_classes``:
    the same values, looked up or sampled when asked for (one bilinear
    interpolation per value, class by class).

    Parameters
    ----------
    A : (K, b, b) complex tensor
        Centred transforms of the class images.
    xy : (M, 2) float tensor
        Frequencies (Fourier px) of the rows.
    psi_rad : (R,) float tensor
        In-plane angles (counter-clockwise rotation of the class), radians.
    zeropad : int
    n_dense : int
        Classes whose rows are made once here (R · M · 8 bytes each).
    """

    def __init__(self, A: Tensor, xy: Tensor, psi_rad: Tensor, zeropad: int, n_dense: int = 0) -> None:
        K, R, M = A.shape[0], len(psi_rad), len(xy)
        self.shape = (K, R, M)
        self.n_dense = min(max(0, int(n_dense)), K)
        self.dense = torch.empty((self.n_dense * R, M), dtype=torch.complex64, device=A.device)
        step = max(1, TABLE_GROUP_VALUES // (R * M))
        for k0 in range(0, self.n_dense, step):
            k1 = min(self.n_dense, k0 + step)
            self.dense[k0 * R : k1 * R] = rotate_classes(A[k0:k1], xy, psi_rad, zeropad).reshape(-1, M)
        self.grids = oversample(A[self.n_dense :], zeropad) if self.n_dense < K else None  # (K - n_dense, 2, p, w)
        # On half-turn pairs rows r + R/2 are the conjugates of rows r (as rotate_classes makes them).
        self.sampled = R // 2 if half_turn_pairs(psi_rad) else R  # rotations sampled
        angles = psi_rad[: self.sampled]
        self.points, self.flip = _half_grid(rotated_points(xy, -angles), zeropad * A.shape[-1], zeropad)

    def rows(self, kr: Tensor) -> Tensor:
        """Rotated transforms of the (class, rotation) rows ``kr`` (flat index k · R + r).

        Parameters
        ----------
        kr : (...) int64 tensor

        Returns
        -------
        (..., M) complex tensor: ``rotate_classes(A, xy, psi_rad, zeropad)[k, r]``.
        """
        K, R, M = self.shape
        flat = kr.reshape(-1)
        k, r = flat // R, flat % R
        out = torch.empty((len(flat), M), dtype=torch.complex64, device=flat.device)
        looked_up = torch.nonzero(k < self.n_dense).squeeze(1)
        out[looked_up] = self.dense[flat[looked_up]]
        order = torch.argsort(k, stable=True)
        counts = torch.bincount(k, minlength=K).tolist()
        start = sum(counts[: self.n_dense])
        for c in range(self.n_dense, K):
            n = counts[c]
            if n:
                sel = order[start : start + n]
                rs = r[sel] % self.sampled
                flip = self.flip[rs] ^ (r[sel] >= self.sampled)[:, None]  # the second half: conjugates
                grid = self.grids[c - self.n_dense : c - self.n_dense + 1]
                v = nnf.grid_sample(grid, self.points[rs].unsqueeze(0), **_BILINEAR)[0]
                out[sel] = torch.complex(v[0], torch.where(flip, -v[1], v[1]))
                start += n
        return out.reshape(*kr.shape, M)
