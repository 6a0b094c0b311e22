"""E-step: posteriors over (shift, class, rotation) as two matrix products.

For a chunk of b particles with Fourier coefficients X (at the E-step points),
CTF c, noise σ² and per-particle scale s, and references Z[k, r] (class k
rotated by ψ_r),

    Y[i, t]  = X_i · exp(+2πi f·t_t) · c_i · w / σ²          (de-shifted data)
    C        = Re⟨Y[i, t], Z[k, r]⟩   one GEMM (b·T × 2M)(2M × K·R)
    N[i, kr] = ⟨c_i² · w / σ², |Z[k, r]|²⟩   one GEMM (b × M)(M × K·R)
    log p    = (s·C − s²·N / 2) / temperature + log π_k

where w = 2 for half-plane points (each stands for a Hermitian pair). The
data model is X = s · c · shift_t(rotate_ψ(A_k)) + noise.

An *empty-box* class (``null_class``) is the hypothesis that the image holds
no particle, X = noise. Its log-likelihood gain over noise is 0 at every
pose, so with a uniform prior over the T · R poses of the other classes its
evidence is log π_0 + log(T · R), carried by one entry (shift 0, rotation 0)
of that class: a particle goes there when Σ_poses exp(gain) < T · R, the
likelihood-ratio test of "a particle of class k somewhere" against "nothing".
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from cryo2d.em import kernels
from cryo2d.em.rotation import TABLE_GROUP_VALUES, RotationTable, half_turn_pairs


#: The empty-box class's least posterior for a particle to be labelled an empty box (:func:`choose_class`).
NULL_MAJORITY = 0.5
#: Most (shift, class, rotation) entries a particle gives the M-step (soft modes; hard: one).
MAX_ENTRIES = 48


@dataclass
class EStepResult:
    """Per-particle outcome of the E-step for one chunk (b particles).

    Attributes
    ----------
    class_post : (b, K) float
        Posterior probability of each class (marginal over poses).
    best_t, best_k, best_r : (b,) int64
        Indices of the most probable (shift, class, rotation); ``hard_class``:
        the most probable within the particle's class (:func:`choose_class`).
    max_prob : (b,) float
        Posterior of that (shift, class, rotation).
    best_cross, best_norm : (b,) float
        C and N at the best pose (for scale estimation), unscaled.
    entry_i, entry_t, entry_k, entry_r : (e,) int64
        The significant (particle, shift, class, rotation) combinations that
        the M-step uses...
    entry_w : (e,) float
        ...and their weights; per particle they sum to 1.
    log_evidence : (b,) float
        log Σ exp(log p) over all poses (up to a per-particle constant).
    """

    class_post: Tensor
    best_t: Tensor
    best_k: Tensor
    best_r: Tensor
    max_prob: Tensor
    best_cross: Tensor
    best_norm: Tensor
    entry_i: Tensor
    entry_t: Tensor
    entry_k: Tensor
    entry_r: Tensor
    entry_w: Tensor
    log_evidence: Tensor

    def only_classes(self, classes: Tensor) -> "EStepResult":
        """The same result with only the significant entries of ``classes`` (weights unchanged)."""
        keep = torch.isin(self.entry_k, classes)
        fields = ("entry_i", "entry_t", "entry_k", "entry_r", "entry_w")
        return replace(self, **{f: getattr(self, f)[keep] for f in fields})


def deshift_phases(xy: Tensor, shifts_px: Tensor) -> Tensor:
    """exp(+2πi f·t / box) for each shift t and frequency f.

    Parameters
    ----------
    xy : (m, 2) float tensor
        Frequencies in Fourier px of a ``box`` grid, already divided by box
        (i.e. cycles/px).
    shifts_px : (T, 2) float tensor
        Shifts (x, y) in px.

    Returns
    -------
    (T, m) complex tensor: multiplying a transform by row t shifts the image by −t.
    """
    phase = 2 * torch.pi * (shifts_px.double() @ xy.double().T)
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


class _Grid:
    """Exhaustive pose table: every (shift t, class k, rotation r), flat index t·KR + k·R + r."""

    def __init__(self, cross: Tensor, norm: Tensor, K: int, R: int) -> None:
        self.cross, self.norm, self.K, self.R = cross, norm, K, R  # (b, T, KR), (b, KR)

    def decode(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        KR = self.K * self.R
        return idx // KR, idx % KR

    def class_marginal(self, post: Tensor) -> Tensor:
        b = post.shape[0]
        return post.view(b, -1, self.K, self.R).sum(dim=(1, 3))

    def in_class(self, keep: Tensor) -> Tensor:
        b = keep.shape[0]
        m = torch.zeros(b, 1, self.K, self.R, dtype=torch.bool, device=keep.device)
        m[torch.arange(b, device=keep.device), 0, keep] = True
        return m.expand(b, self.cross.shape[1], self.K, self.R).reshape(b, -1)

    def cross_norm_at(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        t, kr = self.decode(idx)
        return self.cross.reshape(idx.shape[0], -1).gather(1, idx), self.norm.gather(1, kr)

    def column_classes(self, b: int) -> Tensor:
        cols = torch.arange(self.cross.shape[1] * self.K * self.R, device=self.norm.device)
        return ((cols % (self.K * self.R)) // self.R).expand(b, -1)


class _Poses:
    """Pose table of a local search: per particle, a list of (shift, class·R + rotation) poses."""

    def __init__(self, cross: Tensor, norm: Tensor, t_idx: Tensor, kr_idx: Tensor, K: int, R: int) -> None:
        # all (b, P): C and N of each pose, its shift and its class·R + rotation
        self.cross, self.norm, self.t_idx, self.kr_idx, self.K, self.R = cross, norm, t_idx, kr_idx, K, R

    def decode(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.t_idx.gather(1, idx), self.kr_idx.gather(1, idx)

    def class_marginal(self, post: Tensor) -> Tensor:
        out = torch.zeros(post.shape[0], self.K, dtype=post.dtype, device=post.device)
        return out.scatter_add_(1, self.kr_idx // self.R, post)

    def in_class(self, keep: Tensor) -> Tensor:
        return (self.kr_idx // self.R) == keep[:, None]

    def cross_norm_at(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross.gather(1, idx), self.norm.gather(1, idx)

    def column_classes(self, b: int) -> Tensor:
        return self.kr_idx // self.R


class _Candidates:
    """The fine stage's poses as :class:`_Poses`, read from the candidates: pose (c, j, d), flat index
    (c · 3 + j) · n_off + d, has shift ``t_c[c, d]`` (clamped at 0) and class · R + rotation ``kr_c[c, j]``."""

    def __init__(self, cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, K: int, R: int) -> None:
        # (b, nc, 3, n_off), (b, nc, 3), (b, nc, n_off), (b, nc, 3)
        self.cross, self.norm3, self.t_c, self.kr_c, self.K, self.R = cross, norm3, t_c, kr_c, K, R

    def decode(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        b, n_c, n_off = self.t_c.shape
        cj = idx // n_off
        t = self.t_c.reshape(b, -1).gather(1, (cj // 3) * n_off + idx % n_off).clamp(min=0)
        return t, self.kr_c.reshape(b, -1).gather(1, cj)

    def class_marginal(self, post: Tensor) -> Tensor:
        return kernels.class_sums(post, self.kr_c, self.R, self.K)

    def in_class(self, keep: Tensor) -> Tensor:
        b, n_c, n_off = self.t_c.shape
        return ((self.kr_c[:, :, :1] // self.R) == keep[:, None, None]).expand(b, n_c, 3 * n_off).reshape(b, -1)

    def cross_norm_at(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        b, n_off = idx.shape[0], self.t_c.shape[2]
        return self.cross.reshape(b, -1).gather(1, idx), self.norm3.reshape(b, -1).gather(1, idx // n_off)

    def column_classes(self, b: int) -> Tensor:
        n_c, n_off = self.t_c.shape[1:]
        return (self.kr_c[:, :, :1] // self.R).expand(b, n_c, 3 * n_off).reshape(b, -1)


#: Log-weights (relative to the best) below this get weight 0: exp(-87) = 1.6e-38 is the
#: smallest normal float32 scale (a 48 px chunk's exp: 21 ms -> 1.5 ms; benchmarks/README.md).
_EXP_FLOOR = -87.0


def _zero_shift(phases: Tensor) -> int:
    """Row of the smallest shift among de-shift phases (T, m): zero shift where the grid has it (all phases 1).

    The empty-box class's one pose lies there: its class (zero) scores alike at every shift, and
    a tie broken by the order of the grid wrote empty boxes several pixels off their input origin.
    """
    return int(phases.real.sum(dim=1).argmax())


def choose_class(class_post: Tensor, null_class: int = -1) -> Tensor:
    """(b,) each particle's class from its class posteriors (b, K): the most probable one,
    but the empty-box class ``null_class`` only where it holds ``NULL_MAJORITY`` or more.

    The empty-box hypothesis is one against all the particle classes together.
    Where several classes show similar views, a particle's mass is split among
    them, and each can fall below the empty-box class while their sum is well
    above it (ring at 64 px, SNR 0.05: 121 of the 140 particles that the
    empty-box class held had under half their mass there); such a particle
    goes to its most probable particle class.
    """
    best = class_post.argmax(dim=1)
    if null_class < 0:
        return best
    others = class_post.clone()
    others[:, null_class] = -1.0
    weak = (best == null_class) & (class_post[:, null_class] < NULL_MAJORITY)
    return torch.where(weak, others.argmax(dim=1), best)


def _best_pose_per_class(post: Tensor, classes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Each class's most probable pose: (b, K) column of ``post`` (b, P) (the first of equals), and
    whether the class has a pose of non-zero probability; ``classes`` (b, P) is each column's class."""
    b, P = post.shape
    top = torch.zeros((b, K), dtype=post.dtype, device=post.device).scatter_reduce(1, classes, post, "amax")
    hit = (post == top.gather(1, classes)) & (post > 0)
    cols = torch.where(hit, torch.arange(P, device=post.device).expand(b, P), P)
    first = torch.full((b, K), P, dtype=cols.dtype, device=post.device).scatter_reduce(1, classes, cols, "amin")
    return first.clamp(max=P - 1), first < P


def _top_entries(weights: Tensor, table, max_entries: int, min_weight: float,
                 poses: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """M-step entries (i, t, kr, w) from each particle's ``max_entries`` largest ``weights`` (b, n):
    those at least ``min_weight`` × its largest, renormalised. Column j is pose j of ``table``, or
    pose ``poses[:, j]`` when given (b, n)."""
    b, n = weights.shape
    n_keep = min(max_entries, n)
    w, idx = torch.topk(weights, n_keep, dim=1)
    keep = w >= min_weight * w[:, :1]
    w = torch.where(keep, w, 0.0)
    w = w / w.sum(dim=1, keepdim=True)
    t_all, kr_all = table.decode(idx if poses is None else poses.gather(1, idx))
    e_i = torch.arange(b, device=weights.device)[:, None].expand(b, n_keep)[keep]
    return e_i, t_all[keep], kr_all[keep], w[keep]


def _summarise(logp: Tensor, table, mode: str, max_entries: int, min_weight: float,
               null_class: int = -1) -> EStepResult:
    """Posteriors, best pose and significant entries from log-probabilities (b, P).

    ``logp`` is overwritten. Entries with ``-inf`` (padding) get weight 0.
    ``null_class``: the empty-box class, for ``hard_class`` (:func:`choose_class`).
    """
    b = logp.shape[0]
    R = table.R
    peak = logp.amax(dim=1, keepdim=True)
    shifted = logp.sub_(peak)
    # exp of a value below _EXP_FLOOR is subnormal in float32 (or zero), and x86 CPUs take
    # 10-20 times longer for those: such entries get weight 0 without calling exp on them.
    negligible = shifted < _EXP_FLOOR
    post = shifted.clamp_(min=_EXP_FLOOR).exp_().masked_fill_(negligible, 0.0)
    total = post.sum(dim=1, keepdim=True)
    post.div_(total)
    log_evidence = (peak + torch.log(total)).squeeze(1)
    class_post = table.class_marginal(post)
    inside = table.in_class(choose_class(class_post, null_class)) if mode == "hard_class" else None
    # hard_class: the best pose within the class the particle is given (its written pose), not of all classes
    max_prob, best = (post if inside is None else post.masked_fill(~inside, -1.0)).max(dim=1)
    best_t, best_kr = table.decode(best[:, None])
    best_t, best_kr = best_t[:, 0], best_kr[:, 0]
    best_cross, best_norm = (v[:, 0] for v in table.cross_norm_at(best[:, None]))
    entries = None  # hard: the best poses
    if mode == "max_pose":  # each probable class at its best pose, weighted by the class's posterior
        col, has = _best_pose_per_class(post, table.column_classes(b), class_post.shape[1])
        entries = _top_entries(torch.where(has, class_post, 0.0), table, max_entries, min_weight, col)
    elif mode != "hard":
        if inside is not None:
            post = torch.where(inside, post, 0.0)
            post = post / post.sum(dim=1, keepdim=True)
        entries = _top_entries(post, table, max_entries, min_weight)
    return _result(class_post, best_t, best_kr, R, max_prob, best_cross, best_norm, log_evidence, entries)


def _result(class_post: Tensor, best_t: Tensor, best_kr: Tensor, R: int, max_prob: Tensor, best_cross: Tensor,
            best_norm: Tensor, log_evidence: Tensor, entries: tuple | None = None) -> EStepResult:
    """An :class:`EStepResult` from poses as (shift, class · R + rotation); ``entries`` (i, t, kr, w), None: the best poses."""
    if entries is None:
        rows = torch.arange(len(best_t), device=best_t.device)
        entries = (rows, best_t, best_kr, torch.ones(len(best_t), dtype=max_prob.dtype, device=best_t.device))
    e_i, e_t, e_kr, e_w = entries
    return EStepResult(
        class_post=class_post,
        best_t=best_t,
        best_k=best_kr // R,
        best_r=best_kr % R,
        max_prob=max_prob,
        best_cross=best_cross,
        best_norm=best_norm,
        entry_i=e_i,
        entry_t=e_t,
        entry_k=e_kr // R,
        entry_r=e_kr % R,
        entry_w=e_w,
        log_evidence=log_evidence,
    )


def e_step(
    X: Tensor,
    ctf: Tensor,
    inv_sigma2: Tensor,
    refs: Tensor | RotationTable,
    phases: Tensor,
    log_prior: Tensor,
    scale: Tensor,
    *,
    temperature: float = 1.0,
    mode: str = "soft",
    max_entries: int = MAX_ENTRIES,
    min_weight: float = 5e-3,
    refs_power: Tensor | None = None,
    null_class: int = -1,
) -> EStepResult:
    """Posteriors of one chunk of particles over all (shift, class, rotation).

    Parameters
    ----------
    X : (b, M) complex tensor
        Particle transforms at the E-step points.
    ctf : (b, M) float tensor
        CTF at those points (ones without CTF).
    inv_sigma2 : (M,) float tensor
        Point weight / noise variance (w / σ²).
    refs : (K, R, M) complex tensor, or :class:`~cryo2d.em.rotation.RotationTable`
        Rotated class transforms at the E-step points (a table gives them a
        few classes at a time: memory for the chunk's scores, not K · R · M).
    phases : (T, M) complex tensor
        De-shift phases from :func:`deshift_phases`.
    log_prior : (K,) float tensor
        Log class priors.
    scale : (b,) float tensor
        Per-particle scale factors.
    temperature : float
        Noise-annealing factor (≥ 1): log-likelihoods are divided by it.
    mode : {"soft", "max_pose", "hard", "hard_class"}
        "soft": keep the significant poses over all classes; "max_pose": each
        significant class at its own best (shift, rotation), weighted by the
        class's posterior (marginal over poses; CryoSPARC's force-max over
        poses and shifts); "hard": only the best (shift, class, rotation);
        "hard_class": only poses within the class :func:`choose_class` gives
        (renormalised).
    max_entries : int
        At most this many combinations (max_pose: classes) per particle are kept.
    min_weight : float
        Combinations below ``min_weight × best`` are dropped (max_pose: classes
        below ``min_weight`` × the best class's posterior).
    refs_power : (K, R, M) float tensor, optional
        ``|refs|²``; pass it when the same references serve many chunks
        (computed here otherwise). On a grid of half-turn pairs
        (:func:`~cryo2d.em.rotation.half_turn_pairs`) the first R/2 rows
        suffice, (K, R/2, M): rows r + R/2 have the power of rows r.
    null_class : int
        Index of the empty-box class (see the module docstring), -1 for none;
        its references are ignored.

    Returns
    -------
    EStepResult
    """
    b, m = X.shape
    K, R, _ = refs.shape
    T = phases.shape[0]
    KR = K * R
    P = X * ctf * inv_sigma2
    Y = P.unsqueeze(1) * phases.unsqueeze(0)  # (b, T, M)
    Yr = torch.view_as_real(Y).reshape(b * T, 2 * m)
    ctf2 = (ctf * ctf) * inv_sigma2
    if isinstance(refs, Tensor):
        Zr = torch.view_as_real(refs.reshape(KR, m).contiguous()).reshape(KR, 2 * m)
        cross = (Yr @ Zr.T).view(b, T, KR)
        power = refs.abs().square() if refs_power is None else refs_power
        Rp = power.shape[1]  # R, or R/2 on half-turn pairs
        norm = (ctf2 @ power.reshape(K * Rp, m).T).view(b, K, 1, Rp).expand(b, K, R // Rp, Rp).reshape(b, KR)
    else:  # a RotationTable: the rows of a few classes at a time
        cross = torch.empty((b * T, KR), dtype=Yr.dtype, device=X.device)
        norm = torch.empty((b, KR), dtype=Yr.dtype, device=X.device)
        per = max(1, TABLE_GROUP_VALUES // (R * m))
        for k0 in range(0, K, per):
            cols = slice(k0 * R, min(K, k0 + per) * R)
            Z = refs.rows(torch.arange(cols.start, cols.stop, device=X.device))
            cross[:, cols] = Yr @ torch.view_as_real(Z).reshape(len(Z), 2 * m).T
            norm[:, cols] = ctf2 @ Z.abs().square().T
        cross = cross.view(b, T, KR)
    s = scale.view(b, 1, 1)
    logp = (s * cross - 0.5 * s * s * norm.unsqueeze(1)) / temperature
    logp = logp.view(b, T, K, R) + log_prior.view(1, 1, K, 1)
    if null_class >= 0:  # one pose: rotation 0 at the smallest shift (_zero_shift)
        logp[:, :, null_class] = float("-inf")
        logp[:, _zero_shift(phases), null_class, 0] = log_prior[null_class] + math.log(T * R)
    return _summarise(logp.view(b, -1), _Grid(cross, norm, K, R), mode, max_entries, min_weight, null_class)


#: Coarse (class, rotation) candidates refined per particle, besides each class's best.
N_CANDIDATES = 48

#: Particles whose candidates the fine stage scores at a time on a CPU (their rows stay in
#: the cache), and on a GPU (which wants thousands of rows per product).
FINE_CHUNK = 8
GPU_FINE_CHUNK = 256


def fine_chunk_for(device) -> int:
    """Particles the fine stage of :func:`e_step_coarse_to_fine` scores at a time on ``device``."""
    return FINE_CHUNK if torch.device(device).type == "cpu" else GPU_FINE_CHUNK


#: The fine stage scores each candidate's shifts within this many fine steps in x and y.
SHIFT_REACH = 1


class CoarseGrid(NamedTuple):
    """A coarse search grid and its fine neighbours (:func:`coarse_subgrid`)."""

    coarse_t: Tensor
    neighbours: Tensor
    coarse_r: Tensor
    coarse_m: Tensor
    offset_pairs: Tensor


def coarse_subgrid(
    shifts_px: Tensor, step_px: float, n_rot: int, radius: Tensor, r_coarse: float
) -> CoarseGrid:
    """The coarse search grid of a fine (shift, rotation, frequency) grid, and fine neighbours.

    Coarse shifts are the fine shifts on a lattice of twice the step; coarse
    rotations every second fine rotation (for an odd ``n_rot`` the last and
    the first are one fine step apart; the fine stage's ±1 neighbours of the
    coarse rotations still cover every rotation); coarse
    frequencies those within ``r_coarse`` (about half the fine radius, so a
    one-step error in shift or angle costs little correlation there).

    Parameters
    ----------
    shifts_px : (T, 2) float tensor
        Fine shift grid, px.
    step_px : float
        Its step, px.
    n_rot : int
        Number of fine rotations.
    radius : (M,) float tensor
        Radius of each E-step point, Fourier px.
    r_coarse : float
        Radius of the coarse search, Fourier px.

    Returns
    -------
    CoarseGrid, whose fields are

    coarse_t : (Tc,) int64
        Indices of the coarse shifts among the fine ones.
    neighbours : (Tc, n_off) int64
        For each coarse shift, the fine shifts within ``SHIFT_REACH`` fine steps in
        x and y (-1 where outside the disc), x fastest: n_off = (2·SHIFT_REACH + 1)²
        offsets (-r, -r), (-r + 1, -r), …, (r, r) for r = SHIFT_REACH.
    coarse_r : (⌈R/2⌉,) int64
        Indices of the coarse rotations among the fine ones.
    coarse_m : (Mc,) int64
        Indices of the coarse frequencies among the E-step points.
    offset_pairs : (n_off, 2) int64
        For each offset, a pair of fine shifts (t + offset, t) that both lie in the
        disc, so that their phases' ratio is the offset's ((0, 0) where no pair does).
    """
    lattice = torch.round(shifts_px / step_px).long()
    coarse = torch.nonzero(((lattice[:, 0] % 2) == 0) & ((lattice[:, 1] % 2) == 0)).squeeze(1)
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(lattice.tolist())}
    reach = range(-SHIFT_REACH, SHIFT_REACH + 1)
    offsets = [(dx, dy) for dy in reach for dx in reach]
    neigh = torch.full((len(coarse), len(offsets)), -1, dtype=torch.long)
    pairs = torch.zeros((len(offsets), 2), dtype=torch.long)
    for row, c in enumerate(coarse.tolist()):
        cx, cy = lattice[c].tolist()
        for j, (dx, dy) in enumerate(offsets):
            t = lookup.get((cx + dx, cy + dy), -1)
            neigh[row, j] = t
            if t >= 0:
                pairs[j, 0], pairs[j, 1] = t, c
    dev = shifts_px.device
    coarse_m = torch.nonzero(radius <= r_coarse).squeeze(1)
    return CoarseGrid(coarse.to(dev), neigh.to(dev), torch.arange(0, n_rot, 2, device=dev), coarse_m.to(dev), pairs.to(dev))


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), read once a process."""
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return ()


def bf16_matmul_is_fast(device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (much faster than float32).

    CUDA: compute capability 8.0 or newer. CPU: the AVX512-BF16 or AMX-BF16
    instructions (read from /proc/cpuinfo; elsewhere assumed absent). On
    this project's 2-core machine (AVX512-BF16) a (4366 × 796) · (796 × 900)
    product takes 16 ms in bfloat16 and 44 ms in float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def int8_matmul_is_fast(device) -> bool:
    """Whether the coarse product is best made in int8 on ``device``: an x86 CPU with AVX2 that lacks
    native bfloat16 (:func:`bf16_matmul_is_fast`), with the Numba kernels (:func:`kernels.coarse_images8`).

    On such a CPU (oneDNN's int8 products, AVX2's integer multiply-adds) the coarse products
    of an 80 px job, (25,088 × 220) · (220 × 600) and the like, take 1.44-1.48x less time in
    int8 than in float32 (measured on this project's host with MKL and oneDNN held to AVX2;
    benchmarks/README.md, session 48).
    """
    if torch.device(device).type != "cpu" or not kernels.available(device):
        return False
    return "avx2" in _cpu_flags() and not bf16_matmul_is_fast(device) and _int_mm_works()


@functools.cache
def _int_mm_works() -> bool:
    """Whether this torch multiplies int8 matrices on the CPU (``torch._int_mm``) with exact int32 sums
    at the coarse stage's extremes: images' bytes up to ±127, references' up to ±:data:`REF_LEVELS`."""
    a = torch.tensor([127, -127, 127, 127, -128, 0, 127, -127] * 8, dtype=torch.int8).view(8, 8)
    b = torch.sign(a.T.float()).mul(REF_LEVELS).to(torch.int8)  # the signs of a: every pair adds up
    b[:, 1::2] = -b[:, 1::2]
    try:
        return bool(torch.equal(torch._int_mm(a, b), (a.int() @ b.int())))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def coarse_dtype_for(device) -> torch.dtype:
    """The coarse product's dtype on ``device``: bfloat16 where :func:`bf16_matmul_is_fast`,
    else int8 where :func:`int8_matmul_is_fast`, else float32."""
    if bf16_matmul_is_fast(device):
        return torch.bfloat16
    return torch.int8 if int8_matmul_is_fast(device) else torch.float32


#: The int8 references' largest magnitude. Without VNNI (AVX2, AVX-512 before Cascade Lake) the
#: int8 product multiplies unsigned bytes (the images', shifted by 128) by signed ones (the
#: references') and adds pairs of products in 16 bits with saturation: 255 · 127 · 2 overflows
#: it, and the sums came out wrong by up to 10 % (oneDNN held to AVX2, session 48). With 7-bit
#: references, 255 · 63 · 2 = 32,130 fits, and every host gives the exact sums.
REF_LEVELS = 63.0


class QuantizedRefs(NamedTuple):
    """The coarse references in int8 (:func:`coarse_references` with ``dtype=torch.int8``).

    Row ``j``'s values are ``q[j] · scale[j] / balance`` (real parts, then
    imaginary parts); the images are multiplied by ``balance`` before they are
    quantised (:func:`kernels.coarse_images8`), so the product of the two
    integer rows, times both scales, is their correlation.
    """

    q: Tensor  # (K·Rc, 2·Mc) int8, or (2, K·Rc/2, Mc) on half-turn pairs
    scale: Tensor  # (rows,) float32
    balance: Tensor  # (Mc,) float32


def coarse_references(
    refs: Tensor | RotationTable,
    grid: CoarseGrid,
    refs_power: Tensor | None,
    dtype: torch.dtype = torch.float32,
    pairs: bool = False,
    image_power: Tensor | None = None,
) -> tuple[Tensor | QuantizedRefs, Tensor]:
    """The coarse stage's references, made once for all chunks of a pass.

    Parameters
    ----------
    refs : (K, R, M) complex tensor, or :class:`~cryo2d.em.rotation.RotationTable`
        (sampled a few classes at a time)
    grid : CoarseGrid from :func:`coarse_subgrid`
    refs_power : (K, R, M) float tensor, ``|refs|²`` (None with a table; (K, R/2, M) on half-turn
        pairs, as for :func:`e_step`)
    dtype : torch dtype
        Of the coarse correlation product: float32, bfloat16 where
        :func:`bf16_matmul_is_fast`, or int8 where :func:`int8_matmul_is_fast`;
        the coarse stage only ranks poses.
    pairs : bool
        The references of half-turn pairs of coarse rotations (:func:`paired_coarse_ok`)
        split into real and imaginary parts, the first half of the rotations only:
        the coarse product is then two real products of half its width
        (float32 or int8).
    image_power : (M,) float tensor, optional
        The images' expected power ``E|X · c · w|²`` at each E-step point (int8 only;
        default 1). Each reference row is quantised with its own scale (to ±63,
        :data:`REF_LEVELS`), and each particle's rows with theirs (to ±127), so
        one strong band of points would leave the others few levels: the points
        are first balanced, the references divided and the images multiplied by
        a_f = (ρ_ref(f) / ρ_img(f))^½ (ρ the RMS of each side at the point), so
        that both sides have the same spectrum (their product's). On the 80 px
        set C of session 46 (8-bit references, each chunk's own image power)
        this took the coarse log-likelihoods' error from 1.3-1.9 to 0.09-0.16
        nats (SD; bfloat16: 0.02) against a spread of 40-80 nats over each
        particle's poses (benchmarks/README.md, session 48).

    Returns
    -------
    Zc : tensor or QuantizedRefs
        (K·Rc, 2·Mc) of ``dtype``, the real view of the references at the
        coarse rotations and frequencies; with ``pairs`` (2, K·Rc/2, Mc),
        the real and the imaginary parts of rotations 0 … Rc/2 − 1 (rotation
        r + Rc/2 is the conjugate of rotation r). In int8 a
        :class:`QuantizedRefs` whose rows hold the real parts, then the
        imaginary parts.
    power_c : (K·Rc, Mc) float tensor
        Their power.
    """
    coarse_r, cm = grid.coarse_r, grid.coarse_m
    K, R, M = refs.shape
    Rc, Mc = len(coarse_r), len(cm)
    if dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"coarse references in {dtype}: float32, bfloat16 or int8 only")
    if pairs and (dtype == torch.bfloat16 or not _coarse_pairs(coarse_r, R)):
        raise ValueError(f"coarse references in pairs need float32 or int8 and half-turn pairs of coarse rotations, "
                         f"not {dtype} and {Rc} of {R}")
    h = Rc // 2 if pairs else Rc  # rotations kept per class: with pairs, the first half
    if isinstance(refs, Tensor):
        power_c = refs_power[:, coarse_r % refs_power.shape[1]][:, :, cm].reshape(K * Rc, Mc)
        Z = refs[:, coarse_r[:h]][:, :, cm].reshape(K * h, Mc)
    else:  # bfloat16 rows are written group by group as they are returned (half the bytes of complex rows)
        bf16 = dtype == torch.bfloat16
        Z = torch.empty((K * Rc, 2 * Mc) if bf16 else (K * h, Mc), dtype=dtype if bf16 else torch.complex64,
                        device=cm.device)
        power_c = torch.empty((K * Rc, Mc), device=cm.device)
        per = max(1, TABLE_GROUP_VALUES // (Rc * M))
        for k0 in range(0, K, per):
            k = torch.arange(k0, min(K, k0 + per), device=cm.device)
            Zk = refs.rows((k[:, None] * R + coarse_r[None, :]).reshape(-1))[:, cm]
            power_c[k0 * Rc : k0 * Rc + len(Zk)] = Zk.abs().square()
            rows = Zk.view(len(k), Rc, Mc)[:, :h].reshape(len(k) * h, Mc)
            Z[k0 * h : (k0 + len(k)) * h] = torch.view_as_real(rows).reshape(len(rows), 2 * Mc).to(dtype) if bf16 else rows
        if bf16:
            return Z, power_c
    if dtype == torch.int8:
        return _quantize_references(Z, power_c, image_power, cm, pairs), power_c
    if pairs:
        return torch.stack([Z.real, Z.imag]), power_c
    return torch.view_as_real(Z).reshape(K * Rc, 2 * Mc).to(dtype), power_c


def _quantize_references(Z: Tensor, power_c: Tensor, image_power: Tensor | None, cm: Tensor,
                         pairs: bool) -> QuantizedRefs:
    """:func:`coarse_references`'s int8 references from the complex rows ``Z`` (rows, Mc)."""
    rho_ref = power_c.mean(dim=0).sqrt()
    rho_img = torch.ones_like(rho_ref) if image_power is None else image_power[cm].float().clamp(min=0).sqrt()
    ok = (rho_ref > 0) & (rho_img > 0)
    balance = torch.where(ok, (rho_ref / torch.where(ok, rho_img, 1.0)).sqrt(), 1.0)
    if bool(ok.any()):  # a common factor changes nothing but the values' range
        balance = balance / balance[ok].log().mean().exp()
    Zb = Z / balance
    top = Zb.abs().amax(dim=1)
    s = torch.where(top > 0, REF_LEVELS / top, 0.0)[:, None]
    re, im = torch.round(Zb.real * s).to(torch.int8), torch.round(Zb.imag * s).to(torch.int8)
    q = torch.stack([re, im]) if pairs else torch.cat([re, im], dim=1)
    return QuantizedRefs(q, top / REF_LEVELS, balance.float())


def _coarse_pairs(coarse_r: Tensor, n_rot: int) -> bool:
    """Whether coarse rotation r + Rc/2 is fine rotation coarse_r[r] + R/2 for every r < Rc/2."""
    Rc = len(coarse_r)
    if Rc % 2 or n_rot % 2:
        return False
    return bool(torch.equal(coarse_r[Rc // 2 :], coarse_r[: Rc // 2] + n_rot // 2))


def paired_coarse_ok(psi_rad: Tensor, grid: CoarseGrid | None, dtype: torch.dtype) -> bool:
    """Whether a pass's coarse product is best made on half-turn pairs (``coarse_references(pairs=True)``).

    On half-turn pairs (:func:`cryo2d.em.rotation.half_turn_pairs`) the correlation of a
    particle with the conjugate row is Σ Re·Re − Im·Im where the row's own is
    Σ Re·Re + Im·Im, so two real products of half the width give both: half the
    multiply-adds. That pays where the product is bound by arithmetic, in float32 on a CPU
    (AVX2 hosts; 80 px jobs 16-17 % faster in wall time, benchmarks/README.md, session 47);
    the bfloat16 product of AMX hosts is bound by its output's memory and is not split
    (session 30). The int8 product (:func:`int8_matmul_is_fast`) is split as float32 is.
    Needs an even number of coarse rotations (R a multiple of 4).
    """
    return (grid is not None and dtype in (torch.float32, torch.int8) and kernels.available(grid.coarse_r.device)
            and half_turn_pairs(psi_rad) and _coarse_pairs(grid.coarse_r, len(psi_rad)))


def coarse_maxima(Pc: Tensor, Ec: Tensor, Zc: Tensor | QuantizedRefs, K: int
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Stage 1 of :func:`e_step_coarse_to_fine`: each coarse (class, rotation)'s largest correlation
    over the coarse shifts, and that shift.

    The norm term does not depend on the shift and the scale is positive, so the
    best coarse shift of each column is that of its largest correlation.

    Parameters
    ----------
    Pc : (b, Mc) complex tensor
        The particles' weighted data (X · c · w/σ²) at the coarse points.
    Ec : (Tc, Mc) complex tensor
        The coarse shifts' de-shift phases there.
    Zc : tensor or QuantizedRefs
        From :func:`coarse_references` (float32, bfloat16 or int8; on half-turn pairs or not).
    K : int
        Number of classes.

    Returns
    -------
    best_c : (b, K·Rc) float32 tensor
        The largest correlation of each column (class k, coarse rotation r at k·Rc + r).
    best_t : (b, K·Rc) int64 tensor or None
        Its coarse shift; None where only ``coarse_scores`` holds it (torch's unpaired path,
        where max with indices over all columns took 6x longer than amax: the caller takes
        the best shift of its candidates only).
    coarse_scores : (b, Tc, K·Rc) tensor or None
        Every correlation, where ``best_t`` is None.
    """
    b, Mc, Tc = Pc.shape[0], Pc.shape[1], Ec.shape[0]
    quantized = isinstance(Zc, QuantizedRefs)
    on_cpu = kernels.available(Pc.device)
    if quantized and not on_cpu:
        raise ValueError("int8 coarse references need the CPU kernels (int8_matmul_is_fast)")
    Zt = Zc.q if quantized else Zc
    paired = Zt.dim() == 3  # half-turn pairs: real and imaginary parts of the first Rc/2 rotations
    Rc = (2 if paired else 1) * Zt.shape[-2] // K
    if quantized:  # each row's real parts, then its imaginary parts, balanced and quantised; a scale per particle
        Yc, y_scale = kernels.coarse_images8(Pc, Ec, Zc.balance)
    elif paired and on_cpu:  # each row's real parts, then its imaginary parts
        Yc = kernels.coarse_images_split(Pc, Ec)
    elif paired:
        Yc = torch.view_as_real(Pc.unsqueeze(1) * Ec.unsqueeze(0)).transpose(2, 3).reshape(b * Tc, 2 * Mc)
    elif Zc.dtype == torch.bfloat16 and on_cpu:  # made and rounded in one pass, torch's bits
        Yc = kernels.coarse_images(Pc, Ec)
    else:
        Yc = torch.view_as_real(Pc.unsqueeze(1) * Ec.unsqueeze(0)).reshape(b * Tc, 2 * Mc).to(Zc.dtype)
    coarse_scores = None
    if paired:  # rotation r: Σ Re·Re + Im·Im; its half turn r + Rc/2 (the conjugate row): Σ Re·Re − Im·Im
        if quantized:  # exact int32 sums of the int8 rows
            re, im = torch._int_mm(Yc[:, :Mc], Zt[0].T), torch._int_mm(Yc[:, Mc:], Zt[1].T)
        else:
            re, im = Yc[:, :Mc] @ Zt[0].T, Yc[:, Mc:] @ Zt[1].T  # (b·Tc, K·Rc/2) each
        if on_cpu:
            best_c, best_t = kernels.coarse_max_pairs(re.view(b, Tc, K, Rc // 2), im.view(b, Tc, K, Rc // 2))
        else:
            re, im = re.view(b, Tc, K, Rc // 2), im.view(b, Tc, K, Rc // 2)
            best_c, best_t = torch.cat([re + im, re - im], dim=3).view(b, Tc, K * Rc).max(dim=1)
    else:
        coarse_scores = (torch._int_mm(Yc, Zt.T) if quantized else Yc @ Zt.T).view(b, Tc, K * Rc)
        if coarse_scores.dtype == torch.bfloat16 and on_cpu:  # with each column's best row
            best_c, best_t = kernels.coarse_max(coarse_scores)
            coarse_scores = None
        else:
            best_c, best_t = coarse_scores.amax(dim=1).float(), None
    if quantized:  # both scales: a particle's is the same at every shift, a column's at every particle
        col_scale = Zc.scale.view(K, Rc // 2).repeat(1, 2).view(-1) if paired else Zc.scale
        best_c = best_c.float() * y_scale[:, None] * col_scale[None]
    return best_c, best_t, coarse_scores


def e_step_coarse_to_fine(
    X: Tensor,
    ctf: Tensor,
    inv_sigma2: Tensor,
    refs: Tensor | RotationTable,
    phases: Tensor,
    log_prior: Tensor,
    scale: Tensor,
    grid: CoarseGrid,
    *,
    temperature: float = 1.0,
    mode: str = "soft",
    n_candidates: int = N_CANDIDATES,
    max_entries: int = MAX_ENTRIES,
    min_weight: float = 5e-3,
    refs_power: Tensor | None = None,
    coarse_refs: tuple[Tensor | QuantizedRefs, Tensor] | None = None,
    null_class: int = -1,
    fine_chunk: int = FINE_CHUNK,
    prune: tuple[float, float] | None = None,
) -> EStepResult:
    """Like :func:`e_step`, but searching a coarse grid first, then refining.

    Stage 1 scores every (coarse shift, class, coarse rotation) at the
    coarse frequencies, the grid from :func:`coarse_subgrid` (a quarter of
    the shifts, half of the rotations, the frequencies within the grid's
    coarse radius). Stage 2 takes, per particle, the best coarse pose of
    every class plus the ``n_candidates`` best (class, coarse rotation) pairs
    that are local maxima over rotation (each at its best coarse shift), and
    scores each candidate's own fine neighbourhood: the fine shifts within
    ``SHIFT_REACH`` fine steps of its shift in x and y (9 at reach 1) × the 3
    fine rotations within one fine step of its rotation (a pose two
    candidates share counts once). The posterior is over those fine poses;
    poses far from every candidate get probability 0. Returned shift and
    rotation indices refer to the fine grid. ``refs_power`` (``|refs|²``, as for :func:`e_step`) and ``coarse_refs`` (from
    :func:`coarse_references`) can be made once per pass and passed in; the
    coarse correlations are computed in the dtype of ``coarse_refs``. The
    empty-box class (``null_class``) takes no candidate slot; its evidence is
    that of :func:`e_step`, on one entry. With a
    :class:`~cryo2d.em.rotation.RotationTable` for ``refs``, the fine stage
    takes only the candidates' rows from it and sums their norms from them.
    On a CPU with Numba the fine stage's sums run in one compiled loop per particle
    (:func:`cryo2d.em.kernels.fine_cross`); otherwise (a GPU) as torch products over
    ``fine_chunk`` particles at a time (:func:`fine_chunk_for`).
    With ``prune = (d, f)``, a candidate whose coarse log-probability (tempered, with the
    class prior) lies more than ``d + f·g`` nats below the particle's best candidate is not
    refined, where g is the larger of the two candidates' perfect-fit gains s²·N/2 (tempered;
    N at the candidate's rotation over all E-step points): the coarse grid's misalignment
    costs a share of the signal, so the margin grows with it. A class none of whose
    candidates is refined gets posterior 0.

    In bfloat16 (8-bit mantissa, float32 sums) the coarse log-likelihoods
    of a 64 px particle differ from float32 by 0.03 nats (SD; 1.1 at most)
    against a spread of 270 nats over its poses, and the fine stage scores
    the candidates in float32. In int8 (:class:`QuantizedRefs`, exact int32
    sums) those of an 80 px particle differ by 0.11-0.16 nats (SD) against a
    spread of 40-80 (:func:`coarse_references`).
    """
    b, m = X.shape
    K, R, _ = refs.shape
    coarse_t, neighbours, coarse_r, cm, offset_pairs = grid
    Rc, Tc = len(coarse_r), len(coarse_t)
    P = X * ctf * inv_sigma2
    dense = isinstance(refs, Tensor)
    if refs_power is None and dense:
        refs_power = refs.abs().square()
    Zc, power_c = coarse_references(refs, grid, refs_power) if coarse_refs is None else coarse_refs
    # Stage 1: coarse exhaustive search.
    Pc, Ec = P[:, cm], phases[coarse_t][:, cm]
    best_c, best_t, coarse_scores = coarse_maxima(Pc, Ec, Zc, K)
    s = scale.view(b, 1, 1)
    if dense:  # the norms of every (class, rotation); on half-turn pairs of the first R/2 rotations (Rp)
        Rp = refs_power.shape[1]
        norm_all = ((ctf * ctf) * inv_sigma2) @ refs_power.reshape(K * Rp, m).T  # (b, K·Rp)
    ctf2 = (ctf[:, cm] ** 2) * inv_sigma2[cm]
    norm_c = ctf2 @ power_c.T
    best_lp = (s[:, 0] * best_c - 0.5 * s[:, 0] ** 2 * norm_c).view(b, K, Rc)
    # Candidates: best coarse pose of each class + the n_candidates best (class,
    # rotation) pairs that are local maxima over rotation, each at its best
    # coarse shift. Ranking whole poses filled the list with shift and angle
    # neighbours of one pose, and missed a second mode of the same class.
    cls_r = best_lp.argmax(dim=2)  # (b, K)
    n_top = min(n_candidates, K * Rc)
    peak = (best_lp >= best_lp.roll(1, dims=2)) & (best_lp >= best_lp.roll(-1, dims=2))
    if null_class >= 0:
        peak[:, null_class] = False
    top = best_lp.masked_fill(~peak, float("-inf")).reshape(b, -1).topk(n_top, dim=1).indices  # over K * Rc
    top_k, top_r = top // Rc, top % Rc
    cand_k = torch.cat([torch.arange(K, device=X.device).expand(b, K), top_k], dim=1)
    cand_r = torch.cat([cls_r, top_r], dim=1)
    if null_class >= 0:  # the empty-box class's one pose: rotation 0 at zero shift (below)
        cand_r[:, null_class] = 0
    cols = cand_k * Rc + cand_r  # (b, nc) columns of the coarse scores
    if best_t is not None:
        cand_t = best_t.gather(1, cols)
    else:
        cand_t = coarse_scores.gather(2, cols.unsqueeze(1).expand(b, Tc, cols.shape[1])).argmax(dim=1)  # coarse shift rows
    if null_class >= 0:  # its class scores alike at every shift: the best was an arbitrary tie
        cand_t[:, null_class] = _zero_shift(Ec)
    # Fine neighbourhoods: each candidate's 3 fine rotations × n_off fine shifts (within
    # SHIFT_REACH fine steps of its own). cross[c, r, d] = Re Σ_f P·e(t_c)·conj(Z_cr)·e(d), with
    # e(t) the de-shift phases and e(t_c + d) = e(t_c)·e(d): one product of all candidate
    # rotations against the n_off offsets' phases (conjugated terms: no lazy-conjugate copies).
    n_c = cand_k.shape[1]
    kr_c = torch.stack([cand_k * R + (coarse_r[cand_r] + d) % R for d in (-1, 0, 1)], dim=2)  # (b, nc, 3)
    t_c = neighbours[cand_t]  # (b, nc, n_off) fine shift indices, -1 = outside the disc
    offsets = phases[offset_pairs[:, 0]] * phases[offset_pairs[:, 1]].conj()  # (n_off, M): e(d)
    kr_flat = kr_c.reshape(b, -1)
    t_first = coarse_t[cand_t]  # (b, nc) the candidates' own shifts
    if dense:
        flat_refs = refs.reshape(K * R, m)
        norm = norm_all.gather(1, (kr_flat // R) * Rp + kr_flat % R % Rp)
    else:  # sampled once for the chunk (a table samples class by class)
        Z_all = refs.rows(kr_flat)  # (b, nc*3, M)
        norm = torch.bmm(Z_all.abs().square(), ((ctf * ctf) * inv_sigma2).unsqueeze(2)).squeeze(2)
    # A copy of another candidate (a class's best that is also a top pair: about a quarter of
    # them at 96 px, K = 30) is not scored: each particle's distinct candidates come first,
    # and particles with as many go together, so a group's products are as long as its
    # longest list. The copies' scores stay 0; their poses are masked below.
    copy = _repeated(cols)  # (b, nc)
    if prune is not None:  # candidates far below the particle's best coarse pose are not refined
        cand_lp = best_lp.view(b, K * Rc).gather(1, cols) / temperature + log_prior[cand_k]
        if null_class >= 0:
            cand_lp.masked_fill_(cand_k == null_class, float("-inf"))
        top_lp, top_c = cand_lp.max(dim=1, keepdim=True)
        # s²·N/2: the gain of a perfect fit at the candidate's rotation (all E-step points)
        fit = (s[:, 0] ** 2 * norm.view(b, n_c, 3)[:, :, 1]) / (2 * temperature)
        copy |= cand_lp < top_lp - prune[0] - prune[1] * torch.maximum(fit, fit.gather(1, top_c))
    if kernels.available(X.device):  # one fused pass over each candidate's rows (kernels.fine_cross)
        if dense:
            table, rows3 = flat_refs, kr_c
        else:
            table = Z_all.reshape(-1, m)
            rows3 = torch.arange(b * n_c * 3, device=X.device).view(b, n_c, 3)
        cross = kernels.fine_cross(P, phases, table, rows3, t_first, copy, offsets)
    else:
        cross = _fine_cross_torch(P, phases, flat_refs if dense else Z_all.view(b, n_c, 3, m), kr_c, t_first, copy,
                                  offsets, fine_chunk)
    close = _close_candidates(cand_k, cand_r, Rc)
    null_logp = float(log_prior[null_class]) + math.log(phases.shape[0] * R) if null_class >= 0 else 0.0
    poses = (cross, norm.view(b, n_c, 3), t_c, kr_c, copy, close, scale, log_prior, temperature, K, R, null_class,
             null_logp)
    if mode == "hard" and kernels.available(X.device):  # best pose and posteriors in one pass (kernels.hard_poses)
        return _hard_summary(*poses)
    if kernels.available(X.device):  # the poses scored by kernels.pose_logp, summarised as in torch
        return _kernel_summary(*poses, mode, max_entries, min_weight)
    return _summarise_poses(*poses, mode, max_entries, min_weight)


def _summarise_poses(cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, copy: Tensor, close: Tensor,
                     scale: Tensor, log_prior: Tensor, temperature: float, K: int, R: int, null_class: int,
                     null_logp: float, mode: str, max_entries: int, min_weight: float) -> EStepResult:
    """The result over the fine stage's poses (b, nc, 3, n_off) in torch: every pose scored, then :func:`_summarise`.

    ``cross`` (b, nc, 3, n_off) and ``norm3`` (b, nc, 3) as the fine stage
    makes them; ``t_c`` (b, nc, n_off) each pose's fine shift (−1: outside
    the disc); ``kr_c`` (b, nc, 3) each candidate rotation's class · R +
    rotation; ``copy`` (b, nc) candidates not scored; ``close`` (b,)
    particles whose candidates may share poses (:func:`_close_candidates`);
    the empty-box class ``null_class`` has one pose, at ``null_logp``.
    """
    b, n_c, _, n_off = cross.shape
    pose_t = t_c.unsqueeze(2).expand(b, n_c, 3, n_off).reshape(b, -1)
    pose_kr = kr_c.unsqueeze(3).expand(b, n_c, 3, n_off).reshape(b, -1)
    norm = norm3.view(b, n_c, 3, 1).expand(b, n_c, 3, n_off).reshape(b, -1)
    cross = cross.reshape(b, -1)
    s = scale.view(b, 1)
    logp = (s * cross - 0.5 * s ** 2 * norm) / temperature + log_prior[pose_kr // R]
    # Each pose once (keys < 0: outside the disc). A class's best is often also a top pair: the
    # copy's poses are all repeats. Distinct candidates share a pose only within one coarse
    # rotation of each other in one class (ties, few rotations): those particles' poses are
    # compared one by one (sorting every particle's poses took 4 % of a 96 px pass).
    repeat = (pose_t < 0) | copy.view(b, n_c, 1).expand(b, n_c, 3 * n_off).reshape(b, -1)
    if bool(close.any()):
        rows = torch.nonzero(close).squeeze(1)
        repeat[rows] |= _shared_poses(t_c[rows], kr_c[rows], K * R)
    logp.masked_fill_(repeat, float("-inf"))
    pose_t = pose_t.clamp(min=0)
    if null_class >= 0:  # one entry: the centre pose of its class's candidate (candidate k = class k)
        logp.view(b, n_c, 3 * n_off)[:, null_class] = float("-inf")
        centre = n_off + n_off // 2  # middle rotation, zero offset
        logp.view(b, n_c, 3 * n_off)[:, null_class, centre] = null_logp
    return _summarise(logp, _Poses(cross, norm, pose_t, pose_kr, K, R), mode, max_entries, min_weight, null_class)


def _hard_summary(cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, copy: Tensor, close: Tensor,
                  scale: Tensor, log_prior: Tensor, temperature: float, K: int, R: int, null_class: int,
                  null_logp: float) -> EStepResult:
    """:func:`_summarise_poses` in hard mode, from :func:`kernels.hard_poses` (same arguments, no pose tables).

    The same best pose; probabilities to float32 rounding (other summation
    order). The poses of particles with close candidates are compared one by
    one here, as there.
    """
    repeat_rows, repeat = _close_repeats(close, t_c, kr_c, K * R)
    best, max_prob, log_evidence, class_post = kernels.hard_poses(
        cross, norm3, t_c, kr_c, copy, repeat_rows, repeat, scale, log_prior, temperature, R, K, null_class,
        null_logp, _EXP_FLOOR)
    table, best = _Candidates(cross, norm3, t_c, kr_c, K, R), best[:, None]
    (best_t, best_kr), (best_cross, best_norm) = table.decode(best), table.cross_norm_at(best)
    return _result(class_post, best_t[:, 0], best_kr[:, 0], R, max_prob, best_cross[:, 0], best_norm[:, 0],
                   log_evidence)


def _kernel_summary(cross: Tensor, norm3: Tensor, t_c: Tensor, kr_c: Tensor, copy: Tensor, close: Tensor,
                    scale: Tensor, log_prior: Tensor, temperature: float, K: int, R: int, null_class: int,
                    null_logp: float, mode: str, max_entries: int, min_weight: float) -> EStepResult:
    """:func:`_summarise_poses` with the poses scored by :func:`kernels.pose_logp` (same arguments, same result).

    The log-probabilities and class posteriors are the torch code's bits
    (:func:`kernels.class_sums`); no (b, poses) tables of shifts, rotations
    and norms are made: :class:`_Candidates` reads them from the candidates.
    """
    repeat_rows, repeat = _close_repeats(close, t_c, kr_c, K * R)
    logp = kernels.pose_logp(cross, norm3, t_c, kr_c, copy, repeat_rows, repeat, scale, log_prior, temperature, R,
                             null_class, null_logp)
    return _summarise(logp, _Candidates(cross, norm3, t_c, kr_c, K, R), mode, max_entries, min_weight, null_class)


def _close_repeats(close: Tensor, t_c: Tensor, kr_c: Tensor, KR: int) -> tuple[Tensor, Tensor]:
    """For the kernels: each particle's row of :func:`_shared_poses` (−1: none) and those rows, for the ``close`` particles."""
    b, n_c, n_off = t_c.shape
    repeat_rows = torch.full((b,), -1, dtype=torch.long, device=t_c.device)
    repeat = torch.zeros((0, n_c * 3 * n_off), dtype=torch.bool, device=t_c.device)
    if bool(close.any()):
        rows = torch.nonzero(close).squeeze(1)
        repeat = _shared_poses(t_c[rows], kr_c[rows], KR)
        repeat_rows[rows] = torch.arange(len(rows), device=t_c.device)
    return repeat_rows, repeat


def _shared_poses(t_c: Tensor, kr_c: Tensor, KR: int) -> Tensor:
    """(n, nc · 3 · n_off) bool: the fine poses (shift ``t_c`` (n, nc, n_off), class · R + rotation
    ``kr_c`` (n, nc, 3)) that an earlier candidate of the same particle already has."""
    keys = t_c.unsqueeze(2) * KR + kr_c.unsqueeze(3)  # (n, nc, 3, n_off)
    return _repeated(keys.reshape(len(keys), -1))


def _fine_cross_torch(P: Tensor, phases: Tensor, refs: Tensor, kr_c: Tensor, t_first: Tensor, copy: Tensor,
                      offsets: Tensor, fine_chunk: int) -> Tensor:
    """The fine stage's correlations (b, nc, 3, n_off) in torch (GPU; CPU without Numba): see :func:`kernels.fine_cross`.

    ``refs``: the (K·R, M) reference rows indexed by ``kr_c``, or each candidate's
    own rows (b, nc, 3, M); ``offsets``: (n_off, M) the offsets' phases e(d).
    """
    b, m = P.shape
    n_c, n_off = kr_c.shape[1], offsets.shape[0]
    dense = refs.ndim == 2
    E = torch.stack([offsets.real, offsets.imag], dim=2).reshape(n_off, 2 * m)  # Re(conj(v)·e) = v_re·e_re + v_im·e_im
    n_own = n_c - copy.sum(dim=1)
    own_first = torch.argsort(copy.to(torch.int8), dim=1, stable=True)  # (b, nc) distinct slots first
    by_count = torch.argsort(n_own, stable=True)
    cross = torch.zeros((b, n_c, 3, n_off), device=P.device)
    # A few particles at a time: the candidates' rows (nc·3·M values a particle) then stay in
    # the cache for the products (3,000 particles, 54 candidates, M = 830: 2.0 s in chunks of
    # 64 particles, 0.45 s in chunks of 8; benchmarks/README.md, session 19).
    for i0 in range(0, b, fine_chunk):
        rows = by_count[i0 : i0 + fine_chunk]
        n, nu = len(rows), int(n_own[rows].max())
        slots = own_first[rows, :nu]  # (n, nu)
        Q = P[rows].unsqueeze(1) * phases.index_select(0, t_first[rows].gather(1, slots).reshape(-1)).view(n, nu, m)
        Q = Q.conj_physical_()  # conj(P·e(t_c))
        kr = kr_c[rows].gather(1, slots.unsqueeze(2).expand(n, nu, 3))
        if dense:
            Zf = refs.index_select(0, kr.reshape(-1)).view(n, nu, 3, m)
        else:
            Zf = refs[rows.unsqueeze(1), slots]
        V = Zf.mul_(Q.unsqueeze(2))  # the conjugate of P·e(t_c)·conj(Z), (n, nu, 3, M)
        cross[rows.unsqueeze(1), slots] = (torch.view_as_real(V).reshape(-1, 2 * m) @ E.T).view(n, nu, 3, n_off)
    return cross


def _close_candidates(cand_k: Tensor, cand_r: Tensor, n_coarse_rot: int) -> Tensor:
    """Per particle, whether two candidates of one class lie one coarse rotation apart.

    Only such candidates (or any two with fewer than 3 coarse rotations) can share a fine pose.
    ``cand_k``, ``cand_r``: (b, nc) classes and coarse rotations; returns (b,) bool.
    """
    b = cand_k.shape[0]
    if n_coarse_rot < 3:
        return torch.ones(b, dtype=torch.bool, device=cand_k.device)
    K = int(cand_k.max()) + 1
    taken = torch.zeros((b, K * n_coarse_rot), dtype=torch.bool, device=cand_k.device)
    taken.scatter_(1, cand_k * n_coarse_rot + cand_r, True)
    return taken.gather(1, cand_k * n_coarse_rot + (cand_r + 1) % n_coarse_rot).any(dim=1)


def _repeated(keys: Tensor) -> Tensor:
    """Per row, True where a value already occurred earlier in the row (b, n) -> (b, n) bool."""
    srt, order = keys.sort(dim=1, stable=True)
    again = torch.zeros_like(srt, dtype=torch.bool)
    again[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return torch.zeros_like(again).scatter_(1, order, again)
