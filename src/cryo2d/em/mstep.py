"""M-step: CTF-weighted sums per (class, rotation), back-rotation, Wiener solve.

For the significant (particle i, shift t, class k, rotation r) combinations
with weights w, and with s the per-particle scale and c the CTF,

    S[k, r](f) = Σ w · s_i · c_i(f) · exp(+2πi f·t) · X_i(f)   (scatter-add of the entries)
    Q[k, r](f) = Σ w · s_i² · c_i(f)²

in the frame of the particles; then ``num_k(g) = Σ_r S[k, r](R(ψ_r) g)`` and
``den_k(g) = Σ_r Q[k, r](R(ψ_r) g)`` in the class frame, and

    A_k = num_k / (den_k + σ² / τ²_k)

with τ²_k the class's signal power per shell (DESIGN §2).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from cryo2d.em import kernels
from cryo2d.em.estep import EStepResult
from cryo2d.em.geometry import PointSet, hermitian_grid
from cryo2d.em.rotation import half_plane, quarter_turns, turns_apart, unrotate_sums


# Most bytes the per-(class, rotation) sums of one pass may hold (12 B per row and
# point): beyond it the rows summed so far are back-rotated into the class frame
# and their room reused. 128 px, K = 300: K · R · m · 12 B would be several GB.
SUMS_BUDGET_BYTES = 1 << 30


class PoseSums:
    """Accumulates S and Q (module docstring) over chunks of one batch, and back-rotates them.

    Room for min(K · R, ``budget_bytes`` / 12 m, ``max_rows``) rows (class,
    rotation) is made once; a row gets a room when it is first summed. When the rows
    summed would not fit, the rows held are back-rotated and added to the
    class-frame sums, and their rooms reused (the sums are linear: the
    result is the same up to float rounding). Within the budget the sums and
    their order are those of K · R dense rows.

    Parameters
    ----------
    n_classes : int
        K.
    psi_rad : (R,) float tensor
        The pass's rotations.
    points : PointSet
        The M-step points (a half-plane set, see ``hermitian_grid``).
    work_box : int
    zeropad : int
        Oversampling of the back-rotation.
    device : torch device
    budget_bytes : int
        Most bytes of (class, rotation) rows held at once.
    max_rows : int, optional
        Most distinct rows the pass can sum (its entries: one per particle in
        hard mode): no more room is made than that.
    """

    def __init__(self, n_classes: int, psi_rad: Tensor, points: PointSet, work_box: int, zeropad: int, device,
                 budget_bytes: int = SUMS_BUDGET_BYTES, max_rows: int | None = None) -> None:
        self.K, self.R = n_classes, len(psi_rad)
        self.psi_rad, self.points, self.work_box, self.zeropad = psi_rad, points, work_box, zeropad
        m = len(points)
        self.cap = max(1, int(budget_bytes // (12 * m)))
        rooms = min(self.cap, self.K * self.R, max_rows if max_rows is not None else self.K * self.R)
        self.S = torch.zeros((max(rooms, 1), m, 2), device=device)
        self.Q = torch.zeros((self.S.shape[0], m), device=device)
        self.slot = torch.full((self.K * self.R,), -1, dtype=torch.long, device=device)  # row -> room, -1: none
        self.rows = torch.zeros(0, dtype=torch.long, device=device)  # the row in each room in use
        self.counts = torch.zeros(n_classes, device=device, dtype=torch.float64)
        self.num = torch.zeros((n_classes, m), dtype=torch.complex64, device=device)
        self.den = torch.zeros((n_classes, m), device=device)
        self.flushes = 0
        self._turns = self._quarter_turns()

    def add(self, X: Tensor, ctf: Tensor, scale: Tensor, phases: Tensor, res: EStepResult) -> None:
        """Add one chunk.

        Parameters
        ----------
        X : (b, m) complex tensor
            Particle transforms at the M-step points.
        ctf : (b, m) float tensor
        scale : (b,) float tensor
        phases : (T, m) complex tensor
            De-shift phases of the E-step's shift grid at the M-step points
            (:func:`cryo2d.em.estep.deshift_phases`).
        res : EStepResult
            Its significant combinations and weights.
        """
        kr = res.entry_k * self.R + res.entry_r
        rows, row = torch.unique(kr, return_inverse=True)
        rooms = self._rooms(rows)
        # Occupancy from the same weights as the sums (hard modes: whole particles).
        self.counts.index_add_(0, res.entry_k, res.entry_w.double())
        if kernels.available(X.device):  # each entry added where it goes, in one pass (kernels.scatter_sums)
            kernels.scatter_sums(torch.view_as_complex(self.S), self.Q, rooms[row], res.entry_i, res.entry_t,
                                 res.entry_w, X, ctf, scale, phases)
            return
        # Sparse (rows × distinct (particle, shift)) weights times the de-shifted
        # images: each image is made once, not once per entry (64 px, K = 20:
        # ~39 entries but ~20 distinct (particle, shift) per particle).
        n_t = phases.shape[0]
        pairs, col = torch.unique(res.entry_i * n_t + res.entry_t, return_inverse=True)
        Y = torch.view_as_real((X * ctf * scale[:, None])[pairs // n_t] * phases[pairs % n_t]).flatten(1)  # (u, 2m)
        self.S.index_add_(0, rooms, _sparse_times(row, col, res.entry_w, len(rows), Y).view(len(rows), X.shape[1], 2))
        self.Q.index_add_(0, rooms, _sparse_times(row, res.entry_i, res.entry_w, len(rows), ctf * ctf * (scale * scale)[:, None]))

    def _rooms(self, rows: Tensor) -> Tensor:
        """Room of each (sorted, distinct) row, given room first (back-rotating the rows held if they would not fit)."""
        new = rows[self.slot[rows] < 0]
        if len(new):
            if len(self.rows) + len(new) > self.cap and len(self.rows):
                self._flush()
                new = rows
            need = len(self.rows) + len(new)
            if need > self.S.shape[0]:  # one chunk's rows alone exceed the budget
                m = self.S.shape[1]
                self.S = torch.cat([self.S, self.S.new_zeros((need - self.S.shape[0], m, 2))])
                self.Q = torch.cat([self.Q, self.Q.new_zeros((need - self.Q.shape[0], m))])
            self.slot[new] = torch.arange(len(self.rows), need, device=rows.device)
            self.rows = torch.cat([self.rows, new])
        return self.slot[rows]

    def _flush(self, chunk: int = 256) -> None:
        """Back-rotate the rows held into ``num`` / ``den`` (in row order) and free their rooms.

        Where the angles come in quarter turns (R divisible by 4, ψ[r + R/4] =
        ψ[r] + π/2), the rows of angles r, r + R/4, r + R/2 and r + 3R/4 of a
        class are first turned onto angle r, exactly (:func:`quarter_turns`:
        S(R(ψ_r + q·π/2) g) = T_q(R(ψ_r) g) with T_q(f) = S(R(q·π/2) f)), and
        summed, so that one back-rotation serves four rows; where they come in
        half turns (R even), rows r and r + R/2, two rows.
        """
        n = len(self.rows)
        order = torch.argsort(self.rows)
        rooms = order[(self.Q[:n].sum(dim=1) > 0)[order]]  # rows with weight, in (class, rotation) order
        rows = self.rows[rooms]
        turns = self._turns
        if turns is None:
            for start in range(0, rooms.numel(), chunk):
                rm = rooms[start : start + chunk]
                self._back_rotate(torch.view_as_complex(self.S[rm].contiguous()), self.Q[rm], rows[start : start + chunk])
        else:
            n_fold, src, sign = turns
            step = self.R // n_fold  # rows step rotations apart are turned onto one
            k, r = rows // self.R, rows % self.R
            q, folded = r // step, k * self.R + r % step  # the row each is turned onto
            by_fold = torch.argsort(folded * n_fold + q)
            rooms, q, folded = rooms[by_fold], q[by_fold], folded[by_fold]
            targets, inverse = torch.unique_consecutive(folded, return_inverse=True)
            ends = torch.searchsorted(inverse, torch.arange(chunk, len(targets) + chunk, chunk, device=inverse.device))
            lo = 0
            for start, hi in zip(range(0, len(targets), chunk), ends.tolist()):
                rm, qq, slot = rooms[lo:hi], q[lo:hi], inverse[lo:hi] - start
                tgt = targets[start : start + chunk]
                turn_rows = kernels.turn_rows if kernels.available(self.S.device) else self._turn_rows
                S, Q = turn_rows(self.S, self.Q, rm, qq, slot, len(tgt), src, sign)
                self._back_rotate(torch.view_as_complex(S), Q, tgt)
                lo = hi
        self.S[:n] = 0.0
        self.Q[:n] = 0.0
        self.slot[self.rows] = -1
        self.rows = self.rows[:0]
        self.flushes += 1

    @staticmethod
    def _turn_rows(S: Tensor, Q: Tensor, rooms: Tensor, turn: Tensor, target: Tensor, n_targets: int, src: Tensor,
                   sign: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`kernels.turn_rows` in torch (a GPU's path): the rows of each turn gathered at their
        points, the imaginary parts of the mirrored ones negated, and added onto their targets."""
        out_S = S.new_zeros((n_targets, *S.shape[1:]))
        out_Q = Q.new_zeros((n_targets, Q.shape[1]))
        for t in range(src.shape[0]):
            sel = torch.nonzero(turn == t).squeeze(1)
            if not len(sel):
                continue
            at = rooms[sel]
            if t:  # turned: the values moved, the imaginary parts of the mirrored ones negated
                St = S[at[:, None], src[t][None, :]]
                St[..., 1] *= sign[t]
                out_S.index_add_(0, target[sel], St)
                out_Q.index_add_(0, target[sel], Q[at[:, None], src[t][None, :]])
            else:
                out_S.index_add_(0, target[sel], S[at])
                out_Q.index_add_(0, target[sel], Q[at])
        return out_S, out_Q

    def _back_rotate(self, S: Tensor, Q: Tensor, rows: Tensor) -> None:
        """Add rows (class · R + rotation) of sums S (n, m) complex and Q (n, m) to the class frame."""
        Sg = half_plane(S, self.points, self.work_box)
        Qg = hermitian_grid(Q, self.points, self.work_box)
        s_cls, q_cls = unrotate_sums(Sg, Qg, self.psi_rad[rows % self.R], self.points.xy, self.zeropad)
        self.num.index_add_(0, rows // self.R, s_cls)
        self.den.index_add_(0, rows // self.R, q_cls)

    def _quarter_turns(self) -> tuple[int, Tensor, Tensor] | None:
        """(n, src, sign): the rows of ``src`` (:func:`quarter_turns`), and ±1 for its ``conj``, for
        0 … n − 1 turns of 4/n quarter turns each (n = 4 or 2), as the angles allow; None for neither."""
        for n_fold in (4, 2):
            tables = quarter_turns(self.points, self.work_box) if turns_apart(self.psi_rad, n_fold) else None
            if tables is not None:
                every = 4 // n_fold
                return n_fold, tables[0][::every], 1.0 - 2.0 * tables[1][::every].float()
        return None

    def class_frame(self) -> tuple[Tensor, Tensor]:
        """Back-rotate the sums and add them per class.

        Returns
        -------
        num : (K, m) complex tensor
        den : (K, m) float tensor
        """
        if len(self.rows):
            self._flush()
        return self.num, self.den

    def dense(self) -> tuple[Tensor, Tensor]:
        """The rows held as dense (K · R, m, 2) S and (K · R, m) Q, zero for rows not summed (tests)."""
        n = len(self.rows)
        S = self.S.new_zeros((self.K * self.R, *self.S.shape[1:])).index_copy_(0, self.rows, self.S[:n])
        Q = self.Q.new_zeros((self.K * self.R, self.Q.shape[1])).index_copy_(0, self.rows, self.Q[:n])
        return S, Q


def _sparse_times(row: Tensor, col: Tensor, weight: Tensor, n_rows: int, dense: Tensor) -> Tensor:
    """(n_rows, d) product of the sparse matrix W[row, col] += weight with ``dense`` (n, d); repeated pairs add."""
    with warnings.catch_warnings():  # PyTorch 2.11 warns that the checks are off, which they are on purpose
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        W = torch.sparse_coo_tensor(
            torch.stack([row, col]), weight.to(dense.dtype), (n_rows, dense.shape[0]), check_invariants=False
        )
        return torch.sparse.mm(W, dense)


def shell_mean(values: Tensor, shell: Tensor, n_shells: int) -> Tensor:
    """Mean of ``values`` (..., m) per shell index (m,), as (..., n_shells); 0 for empty shells."""
    flat = values.reshape(-1, values.shape[-1])
    out = torch.zeros((flat.shape[0], n_shells), dtype=flat.dtype, device=flat.device)
    out.index_add_(1, shell, flat)
    cnt = torch.bincount(shell, minlength=n_shells).clamp(min=1).to(flat.dtype)
    return (out / cnt).reshape(*values.shape[:-1], n_shells)


def estimate_tau2(num: Tensor, den: Tensor, sigma2: Tensor, shell: Tensor, n_shells: int, fudge: float) -> Tensor:
    """Signal power per class and shell from the unregularised class estimate.

    τ²_k(s) = fudge · mean_s( |num/den|² − σ²/den ), the power of the
    data-only average less its noise bias, floored where that is not
    positive: at the power whose SSNR (:func:`ssnr`) is 10⁻³, and never above
    10⁻⁶ of the class's largest τ² (the floor of an empty class). A floor of
    10⁻⁶ of the largest τ² alone gave a junk class with a strong low
    frequency an SSNR above 1 in every shell, so the run's resolution jumped
    to Nyquist (64 px, K = 20: two online iterations at radius 31 instead of
    16, 4.5 s each instead of 1.7).

    Parameters
    ----------
    num : (K, m) complex, den : (K, m) float
        Class-frame sums (see module docstring).
    sigma2 : (m,) float
        Noise variance at each point.
    shell : (m,) int64
    n_shells : int
    fudge : float
        RELION's tau2_fudge.

    Returns
    -------
    (K, n_shells) float tensor
    """
    valid = den > 1e-6 * den.amax(dim=1, keepdim=True).clamp(min=1e-30)
    safe = torch.where(valid, den, torch.ones_like(den))
    power = torch.where(valid, (num.abs() / safe) ** 2 - sigma2 / safe, torch.zeros_like(den))
    tau2 = fudge * shell_mean(power, shell, n_shells)
    precision = shell_mean(den / sigma2, shell, n_shells)  # SSNR = (τ²/fudge) · precision
    floor = torch.minimum(1e-3 * fudge / precision, 1e-6 * tau2.amax(dim=1, keepdim=True).clamp(min=1e-30))
    return torch.maximum(tau2, floor)


def solve_classes(num: Tensor, den: Tensor, sigma2: Tensor, tau2: Tensor, shell: Tensor) -> Tensor:
    """Wiener solution A_k = num_k / (den_k + σ²/τ²_k) at each point.

    Parameters
    ----------
    num : (K, m) complex, den : (K, m) float, sigma2 : (m,) float
    tau2 : (K, n_shells) float
    shell : (m,) int64

    Returns
    -------
    (K, m) complex tensor
    """
    return num / (den + sigma2[None] / tau2[:, shell])


def ssnr(den: Tensor, sigma2: Tensor, tau2: Tensor, shell: Tensor, n_shells: int, fudge: float) -> Tensor:
    """Spectral SNR per class and shell: (τ²/fudge) · mean_shell(den) / σ² (RELION's data_vs_prior)."""
    return (tau2 / fudge) * shell_mean(den / sigma2[None], shell, n_shells)


def resolution_shell(snr: Tensor, start: int = 1) -> Tensor:
    """Per class, the last shell before the SSNR first drops below 1 from shell ``start`` on (≥ 1).

    Parameters
    ----------
    snr : (K, n_shells) float
    start : int
        First shell looked at: the alignment band's (``--min-align-res``),
        below which the classes' SSNR says nothing about the search.

    Returns
    -------
    (K,) int64 tensor
    """
    start = max(1, start)
    return (_first_true(snr[:, start:] < 1) + start - 1).clamp(min=1)


def _first_true(below: Tensor) -> Tensor:
    """(K, S) bool -> (K,) index of each row's first True, S where none."""
    return torch.where(below.any(dim=1), below.float().argmax(dim=1), torch.full_like(below[:, 0], below.shape[1], dtype=torch.long))


def class_resolution_shell(snr: Tensor, last: int | None = None) -> Tensor:
    """Per class, the last shell before the smoothed SSNR (K, n_shells) drops below 1 after its peak: (K,) int64, ≥ 1.

    What a class's resolution is reported as. At the lowest shells the CTF
    is near its amplitude contrast (about 0.1), so a class of a few dozen
    particles can have an SSNR below 1 at shells 1-3 and well above 1
    further out; :func:`resolution_shell` (first drop, the search's
    conservative radius) then reports the box size. Here the SSNR is
    averaged over 3 neighbouring shells and the drop is looked for after
    its peak; a class whose smoothed SSNR never reaches 1 gets shell 1.
    ``last``: the last shell that holds points (default: the last of
    ``snr``); the shells beyond it (SSNR 0, outside the run's band) are not
    smoothed in, so a class is never reported finer than the band (with
    them, a high SSNR at the band's edge reached a shell or two past it:
    22.8 Å for classes made at 25 Å).
    """
    s = snr[:, 1 : None if last is None else last + 1].float()
    smooth = torch.nn.functional.avg_pool1d(s[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    peak = smooth.argmax(dim=1, keepdim=True)
    index = torch.arange(s.shape[1], device=s.device)[None]
    first = _first_true((smooth < 1) & (index > peak))
    first = torch.where(smooth.amax(dim=1) < 1, torch.ones_like(first), first)
    return first.clamp(min=1)


#: The χ² quantile beyond which a particle's residual at a shell is left out of the noise model (:func:`robust_shell_noise`).
NOISE_TRIM_P = 0.999


def gamma_quantile(k: Tensor, p: float) -> Tensor:
    """The ``p`` quantile of Gamma(k, 1) for each shape in ``k`` (float64), by bisection on the regularised
    lower incomplete gamma function."""
    k = k.double()
    lo, hi = torch.zeros_like(k), k + 20.0 * torch.sqrt(k) + 20.0  # above every quantile up to 1 - 1e-12
    for _ in range(64):
        mid = (lo + hi) / 2
        below = torch.special.gammainc(k, mid) < p
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def robust_shell_noise(shell_resid: Tensor, shell_points: Tensor, trim_p: float = NOISE_TRIM_P) -> Tensor:
    """Noise power per point of each shell from per-particle residuals, leaving out the particles that no noise explains.

    A particle's residual power averaged over a shell's n half-plane points
    is σ² · χ²_d / d for one that the model fits, with d = 2n real degrees
    of freedom (d = 1 for shell 0, the real origin). First σ² from the
    median over the particles (the median of χ²_d / d is known), which junk
    moves only by the share of the images it is; then the mean over the
    particles whose residual lies below the ``trim_p`` quantile of that
    distribution, divided by the mean that truncation leaves of χ²_d / d.
    Junk whose excess power lies at a few low-frequency points (ice
    gradients: 50x the particles' power at shells 0-1) is left out there,
    where it passes a test on the whole residual. A median alone would
    do that too, but where the model's own error is a large part of the
    residual (SNR 10), it fell well below the mean, and a second
    Class2D round on the first's particles merged two of three views.

    Parameters
    ----------
    shell_resid : (b, n_shells) float tensor
        Each particle's summed |residual|² over each shell's points.
    shell_points : (n_shells,) float tensor
        Points of each shell.
    trim_p : float
        Quantile of χ²_d / d beyond which a particle's shell is left out.

    Returns
    -------
    (n_shells,) tensor of ``shell_resid``'s dtype: σ² per point, 0 for
    shells without points.
    """
    pts = shell_points.to(shell_resid.dtype)
    median_ratio, cut_ratio, truncated = (
        x.to(shell_resid) for x in _chi2_ratios(tuple(shell_points.tolist()), trim_p)
    )
    per = shell_resid / pts.clamp(min=1)
    first = torch.quantile(per, 0.5, dim=0) / median_ratio
    keep = per <= first * cut_ratio
    kept_mean = (per * keep).sum(dim=0) / keep.sum(dim=0).clamp(min=1)
    return torch.where(pts > 0, kept_mean / truncated, torch.zeros_like(kept_mean))


@functools.lru_cache(maxsize=64)
def _chi2_ratios(points: tuple, trim_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """For shells of ``points`` half-plane points: the median, the ``trim_p`` quantile and the mean below
    that quantile of χ²_d / d (d = 2 · points, 1 for the origin's shell 0), float64 on the CPU.

    They depend on the shells alone, which stay the same from pass to pass at
    one resolution, so they are computed once (each bisection is 64 steps).
    """
    dof = 2 * torch.tensor(points, dtype=torch.float64)
    dof[0] = torch.clamp(dof[0] - 1, min=0)  # shell 0 holds the origin alone, a real value
    k = dof.clamp(min=1) / 2
    g_cut = gamma_quantile(k, trim_p)
    truncated = torch.special.gammainc(k + 1, g_cut) / torch.special.gammainc(k, g_cut)
    return gamma_quantile(k, 0.5) / k, g_cut / k, truncated
