"""The online-EM 2D classification loop (DESIGN §2).

``run_em`` draws batches of ``batch_size_per_class × n_classes`` particles for
``n_online_iterations`` iterations, updating classes from running sufficient
statistics, then makes ``n_full_iterations`` passes over all particles; the
last pass assigns every particle. Everything random flows from ``config.seed``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryo2d.em import kernels
from cryo2d.em import state as st
from cryo2d.em.config import EMConfig, check_device
from cryo2d.em.data import PointCache, batch_ctf, load_batch, noise_spectrum, tune_allocator
from cryo2d.em.estep import (
    MAX_ENTRIES,
    N_CANDIDATES,
    SHIFT_REACH,
    CoarseGrid,
    EStepResult,
    coarse_dtype_for,
    coarse_references,
    coarse_subgrid,
    deshift_phases,
    e_step,
    e_step_coarse_to_fine,
    fine_chunk_for,
    paired_coarse_ok,
)
from cryo2d.em.geometry import Geometry, PointSet, disc_points, hermitian_grid, make_geometry, soft_mask
from cryo2d.em.moves import _INIT_READ, _REFINE_CHUNK, ClassMoves
from cryo2d.em.mstep import (
    PoseSums, class_resolution_shell, estimate_tau2, resolution_shell, robust_shell_noise, shell_mean, solve_classes, ssnr,
)
from cryo2d.em.refine import refine_poses
from cryo2d.em.start import start_classes
from cryo2d.em.rotation import (
    RotationTable, half_turn_pairs, oversample, psi_grid, rotate_classes, rotated_points, sample_half, wrapped,
)
from cryo2d.errors import Cryo2DError
from cryo2d.fourier import fft2c, freq_grid, ifft2c, pad_fourier
from cryo2d.particles import ParticleSet

# The online iterations' class moves (cryo2d.em.moves, measured there): merges of
# redundant classes from this fraction of them on, the empty-box class from this one,
# by start. The split start's stages have no empty-box class, so its empty boxes
# gather in a class of their own and the rarer views that fit no class go with
# them; the empty-box class from a quarter of the iterations on takes them out
# while the other moves can still give those views a class (48 px test set, EM
# seeds 0-9: the rare view kept in 8 runs against 4 from half; over 34 runs of
# eight sets junk F1 +0.019, NCC -0.004, the rare view kept in 18 against 12;
# benchmarks/README.md, session 57). From random subsets every class starts as a
# blur, and half stays.
_MERGE_FROM = 0.25
_NULL_FROM = {"split": 0.25, "random": 0.5}
# Search radius: the resolution shell of the running sums + _RES_MARGIN, but
# at most _DISTINCT_MARGIN beyond that of the distinct particles (see
# _update_classes; measured in benchmarks/README.md, "Reading the quality
# figures": margin 3 before the class masks, 2 with them).
_RES_MARGIN = 2.0
_DISTINCT_MARGIN = 6.0
# Fewest typical particles for the noise model's per-shell trimming (mstep.robust_shell_noise); fewer: their mean.
_ROBUST_MIN = 8
# Each class's own mask for the search (config.auto_mask): the class low-passed
# (Gaussian, sigma = box / _AUTO_BLUR), thresholded at _AUTO_MASK of its
# maximum, dilated by box / _AUTO_DILATE and given a soft edge of sigma
# _AUTO_SOFT px. Thresholds 0.08 / 0.15 / 0.25 on the 48 px set (seeds 0-5,
# positive density): purity 0.89 / 0.92 / 0.92, junk F1 0.81 / 0.83 / 0.81;
# |density| at 0.15: 0.91 / 0.80, whatever the particles' contrast
# (benchmarks/README.md, "Reading the quality figures").
_AUTO_MASK = 0.15
# Of the thresholded regions (8-connected), those whose peak density reaches
# _AUTO_KEEP of the class's peak: the particle, not the noise blobs a small
# class carries above the threshold. `hard` seeds 0-2, NCC 0.878 / 0.892 /
# 0.886 -> 0.905 / 0.908 / 0.899; 0.3 and 0.7 score alike (benchmarks/README.md,
# session 8).
_AUTO_KEEP = 0.5
_AUTO_BLUR = 24.0
_AUTO_DILATE = 16.0
_AUTO_SOFT = 1.5
# Online iterations sum the M-step only within this multiple of the E-step
# radius (+4 Fourier px), as RELION's current_size: beyond it the classes hold
# noise, and the resolution can still grow by half the radius an iteration.
# Full passes sum every M-step point.
_MSTEP_RADIUS = 1.5
# Default shift step: box / (this × E-step radius), at least one working px
# (DESIGN: the shift step follows the resolution, as the angular step does).
# 64 px, K = 20: the peer job 32.8 -> 25.5 s; 6 seeds of the 48 px set and 3
# of the hard set: scores within their seed-to-seed spread (benchmarks/README.md).
_SHIFT_STEP_DIV = 4.0
_INIT_PSI_STEP = 5.0  # degrees: the starting classes' random angles lie on this grid
# The default --average-res (Nyquist) runs the pass only when it widens the classes' Fourier
# radius by this factor: 128 px at 2.85 Å, 6 -> 5.7 Å, would add the pass and its pose
# refinement (20,000 particles, K = 50: 28 s) to a 7-minute job for 5 % more radius.
_AVERAGE_GAIN = 1.1
_AVERAGE_REACH = 0.8  # the pass widens the band only for classes whose resolution reaches this fraction of it
_NOISE_READ = 1024  # images whose backgrounds give the noise beyond the run's band (Engine.average_pass)
_PSI_STEPS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5, 8.0, 9.0, 10.0, 12.0, 15.0, 20.0, 30.0)
# The E-step's rotated references (K · R · M complex values and their power,
# 12 bytes each) are made once per pass up to this size; beyond it a
# RotationTable makes the rows of the classes that fit in it (8 bytes a value)
# and samples the other classes' rows each chunk needs (benchmarks/README.md,
# "Memory": sampling all of them, 3,000 particles, K = 300: 261 -> 334 s,
# peak RSS 2.6 -> 1.8 GB, the same classes).
REFS_BUDGET_BYTES = 1 << 30
# E-step chunks: bytes of intermediates and the most particles in one. CPU: 512 MB; with the
# compiled kernels a chunk's fixed costs weigh more than they did, and 256 MB chunks (126
# particles at 80 px, K = 24) made the ribosome 80 px job 8-16 % slower, peak RSS 1.11 against
# 1.27-1.32 GB, the same files (benchmarks/README.md, session 27). GPU: a 16th of its
# memory, at most 4 GB and 4,096 particles (larger products keep its cores busy; one H200
# peaked at 10.3 GB for 128 px, K = 100: benchmarks/README.md, On a GPU).
CPU_CHUNK = (512e6, 512)
GPU_CHUNK = (4e9, 4096)


def refs_budget(device) -> int:
    """Bytes the E-step's rotated references may take on ``device``.

    :data:`REFS_BUDGET_BYTES` on the CPU. On a GPU a quarter of its memory,
    if that is more: there the dense references are far faster than
    sampling rows class by class, and 300 classes at 6 Å need about 4 GB.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return max(REFS_BUDGET_BYTES, torch.cuda.get_device_properties(device).total_memory // 4)
    return REFS_BUDGET_BYTES


def chunk_budget(device) -> tuple[float, int]:
    """(bytes of E-step intermediates, most particles) per chunk on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(GPU_CHUNK[0], total / 16), GPU_CHUNK[1]
    return CPU_CHUNK


@dataclass
class IterationPlan:
    """Search grid of one iteration (depends on the current resolution)."""

    r_cur: float
    psi_rad: Tensor
    shifts_px: Tensor  # (T, 2) working px
    points: PointSet  # E-step points
    temperature: float
    r_mstep: float = math.inf  # M-step points beyond this radius (Fourier px) get no sums this pass
    shift_step: float = 1.0  # step of the shifts' lattice, working px
    ctf2_shell: Tensor | None = None  # (n_shells,) mean s²·c² of the class sums, for the int8 coarse product; None: none


@dataclass
class ShardSums:
    """What one shard of a pass returns (:meth:`Engine.pass_shard`); shards add up.

    Attributes
    ----------
    num : (K, m) complex64 tensor
        Class-frame numerator sums at the M-step points (linear in the particles).
    den : (K, m) float32 tensor
        Class-frame denominator sums.
    counts : (K,) float64 tensor
        Class occupancy (sum of the M-step weights).
    shell_resid : (b, n_shells) float64 tensor
        Per particle, residual power |X − s·c·Z| ² at the best pose summed per
        Fourier shell (the robust noise model picks particles over the whole pass).
    shell_points : (n_shells,) float64 tensor
        M-step points per shell that the pass summed over (the same in every shard).
    per : dict of (b, ...) numpy arrays
        Per-particle results in the shard's order (keys as :meth:`Engine.record` reads).
    """

    num: Tensor
    den: Tensor
    counts: Tensor
    shell_resid: Tensor
    shell_points: Tensor
    per: dict


@dataclass
class EMResult:
    """Output of :func:`run_em` (classes in the engine's order, unsorted).

    Attributes
    ----------
    classes : (K, box, box) float32
        Class averages at the input box and pixel size.
    counts : (K,) float64
        Particles per class (hard count in the final assignment).
    resolution_angst : (K,) float64
        SSNR-based resolution per class (Å; :func:`~cryo2d.em.mstep.class_resolution_shell`).
    class_index, psi_deg, shift_px, max_prob, class_posterior, class_ess, scale :
        Per-particle results (see :class:`cryo2d.particles.Assignments`);
        shifts in px of the input box.
    history : list of dict
        One entry per iteration (also written to iterations.jsonl).
    geometry : Geometry
    empty_class : int
        The class that holds the empty boxes (``EMConfig.empty_class``), -1 for none.
    classes_unmasked : (K, box, box) float32 or None
        With ``EMConfig.flatten_solvent``, the class averages before the
        solvent mask (what the junk scores of ``cryo2d select`` read);
        None otherwise.
    """

    classes: np.ndarray
    counts: np.ndarray
    resolution_angst: np.ndarray
    class_index: np.ndarray
    psi_deg: np.ndarray
    shift_px: np.ndarray
    max_prob: np.ndarray
    class_posterior: np.ndarray
    class_ess: np.ndarray
    scale: np.ndarray
    history: list = field(default_factory=list)
    geometry: Geometry | None = None
    empty_class: int = -1
    classes_unmasked: np.ndarray | None = None


def _add_sums(total: tuple | None, part: tuple) -> tuple:
    """Element-wise sum of two (num, den, counts) tuples; ``part`` when ``total`` is None."""
    return part if total is None else tuple(a + c for a, c in zip(total, part))


def _keep_strong_regions(support: Tensor, density: Tensor, level: Tensor) -> Tensor:
    """``support`` (K, B, B) bool without its 8-connected regions whose maximum ``density`` is below ``level`` (K, 1, 1).

    Returns a (K, B, B) float tensor of 0 and 1. A region is kept when it
    holds a pixel at or above its class's ``level``: those pixels are grown
    within ``support`` (a flood fill, :func:`kernels.grow_regions`, on a CPU;
    on a GPU one 8-neighbour step at a time until nothing changes).
    """
    kept = support & (density >= level)
    if kernels.available(support.device):
        return kernels.grow_regions(support, kept).to(torch.float32)
    while True:
        before = kept
        for _ in range(4):  # one 8-neighbour step each (a 3 x 3 dilation as two 1-D ones); test for the end every few
            rows = kept.clone()
            rows[:, 1:] |= kept[:, :-1]
            rows[:, :-1] |= kept[:, 1:]
            kept = rows.clone()
            kept[:, :, 1:] |= rows[:, :, :-1]
            kept[:, :, :-1] |= rows[:, :, 1:]
            kept &= support
        if torch.equal(kept, before):
            return kept.to(torch.float32)


def _same_grid(a: IterationPlan, b: IterationPlan) -> bool:
    """Whether two plans search the same grid (all but the temperature equal): successive iterations at one
    resolution make new plans of the same values, and share :meth:`Engine._plan_setup`'s set-up."""
    if a is b:
        return True
    return (a.r_cur == b.r_cur and a.r_mstep == b.r_mstep and a.shift_step == b.shift_step
            and all(x.shape == y.shape and torch.equal(x, y) for x, y in (
                (a.psi_rad, b.psi_rad), (a.shifts_px, b.shifts_px), (a.points.flat, b.points.flat),
                (a.points.weight, b.points.weight))))


#: Pixel sizes that differ by at most this fraction (optics groups of two sessions,
#: calibrated apart) are classified together: at the run's pixel size (the median),
#: each particle's CTF at its own (:func:`cryo2d.em.data.batch_ctf`).
PIXEL_SIZE_RTOL = 0.02


def check_settings(particles: ParticleSet, config: EMConfig) -> Geometry:
    """The settings checked against the particles' box and pixel size; the geometry they give.

    :class:`Engine` checks them; a stream checks them as soon as its first
    particles arrive, not at its first update (100,000 particles later at K = 50).
    Raises :class:`~cryo2d.errors.Cryo2DError` for an input origin (used with
    ``config.input_shifts``) that puts a particle's centre outside its box, a
    search disc of half the box or more, and for what :func:`make_geometry` refuses.
    """
    if config.input_shifts and particles.prior_shift_px is not None:
        reach = np.abs(particles.prior_shift_px).max(axis=1)  # px from the box centre along x or y
        outside = reach >= particles.box / 2
        if outside.any():
            i = int(np.argmax(outside))
            raise Cryo2DError(f"{particles.source.name}: particle {i + 1}'s origin puts its centre "
                              f"{reach[i]:.1f} px from the box centre, outside "
                              f"its {particles.box} px box (or use --no-input-shifts)")
    if config.shift_range_px is not None and config.shift_range_px >= particles.box / 2:
        # Two shifts of a disc this wide can differ by a whole box, which is one pose (the image wraps).
        raise Cryo2DError(f"{particles.source.name}: --shift-range {config.shift_range_px:g} px is half its "
                          f"{particles.box} px box or more, where shifts wrap around onto each other "
                          f"(give less than {particles.box / 2:g})")
    return make_geometry(particles.box, _single_pixel_size(particles), config)


def _single_pixel_size(particles: ParticleSet) -> float:
    """The run's pixel size, Å: the median of the particles', which may differ by ``PIXEL_SIZE_RTOL``."""
    p = np.asarray(particles.pixel_size_angst, dtype=np.float64)
    mid = float(np.median(p))
    if np.abs(p - mid).max() > PIXEL_SIZE_RTOL * mid:
        raise Cryo2DError(
            f"{particles.source.name}: particles have pixel sizes {p.min():.4f}-{p.max():.4f} Å, more than "
            f"{100 * PIXEL_SIZE_RTOL:g} % apart; classify each optics group separately (or rescale them to one)"
        )
    return mid  # one pixel size: exactly it


def temperature_at(config: EMConfig, iteration: int) -> float:
    """Noise-annealing factor of an online iteration: ICUF, then linear to 1."""
    f = config.uncertainty_factor
    if iteration < config.anneal_start:
        return f
    if config.anneal_iterations <= 0:
        return 1.0
    frac = min(1.0, (iteration - config.anneal_start + 1) / config.anneal_iterations)
    return f + (1.0 - f) * frac


#: A force-max run's full search (hard, max_pose and hard_class passes: the M-step takes at most
#: one pose per class) skips, in its fine stage, a candidate whose tempered coarse
#: log-probability lies more than PRUNE_NATS + PRUNE_SIGNAL × (perfect-fit gain s²·N/2) below
#: the particle's best (:func:`e_step_coarse_to_fine`'s ``prune``; RELION's adaptive
#: oversampling keeps the coarse poses that hold 99.9 % of the mass, about 7 nats). Over every
#: E-step of whole jobs, against the unpruned stage, a skipped candidate came within 3 nats of
#: the refined best for none of 69,188 particle searches (bundled map 96 px, K = 30), 55,634
#: (ribosome 80 px), 36,192 and 35,202 (bundled map and haemoglobin at SNR 0.3), and for 1 of
#: 44,854 (SNR 0.05: a class of zero reference led the coarse stage). A fixed margin fails at
#: high SNR, where the coarse grid loses hundreds of nats of a good fit (40 nats: 34 of the
#: 36,192; 20 nats + a quarter: 1 of the 35,202). Candidates refined a particle: 62 -> 41
#: (96 px), 60 -> 47 (80 px), 52 -> 22 and 34 of 64 slots (SNR 0.3), 51 -> 51 (SNR 0.05:
#: spread posteriors). Searches of a few classes (growing classes against a rival) are not
#: pruned: their particles often fit none of the classes. Nor are soft passes (K <= 20 by
#: default): their posteriors spread over classes, little is skipped at low SNR, and the
#: demo's run (48 px, K = 12) moved from junk F1 0.810 / purity 0.926 to 0.768 / 0.909 with
#: the skip. In force-max runs at K = 24-50 (session 44: 48 px sets, 11 runs) the skip left every
#: written label, angle and shift as without it.
PRUNE_NATS = 30.0
PRUNE_SIGNAL = 0.25

#: Force max over poses (``force_max``) gives a particle to each probable class at that class's
#: best pose, weighted by the class's posterior ("max_pose"), where the set has fewer particles
#: than this per class; with more, to its one best (class, pose) alone ("hard"). One class per
#: particle in every pass left many classes of a few dozen particles fitting their members'
#: noise (48 px sets, K = 50, 30 a class: view purity 0.770 against 0.920 with max_pose, 6
#: runs; 100 a class, 64 px: 0.137 against 0.159), while large classes stay sharper with it
#: (views uniform over the sphere, 64 px, K = 50: 160 a class 0.179 against 0.168, 400 a
#: class 0.213 against 0.157, 2 runs each; benchmarks/README.md, session 44).
MAX_POSE_BELOW = 128


def auto_psi_step(r_cur: float, geom: Geometry) -> float:
    """In-plane step (degrees) so the particle edge moves ≤ half a resolution element.

    At radius ρ (half the particle diameter, working px) and resolution
    radius r (Fourier px), an arc of ρ·Δψ must stay ≤ box / (2r).
    """
    rho = 0.5 * geom.particle_diameter_angst / geom.work_pixel_angst
    step = math.degrees(geom.work_box / (2.0 * max(r_cur, 1.0) * max(rho, 1.0)))
    return max(s for s in _PSI_STEPS if s <= max(step, _PSI_STEPS[0]))


def shift_step(r_cur: float, geom: Geometry, config: EMConfig) -> float:
    """Shift step, working px: ``--shift-step``, or one working px refined to the resolution.

    By default a step of box / (_SHIFT_STEP_DIV · r), at least one working
    px: at E-step radius r the grid's error (half a step per axis) then
    moves the phase of the edge frequency by at most π / 4 along an axis.
    """
    if config.shift_step_px is not None:
        return config.shift_step_px * geom.work_box / geom.box
    return max(1.0, geom.work_box / (_SHIFT_STEP_DIV * max(r_cur, 1.0)))


def shift_range(geom: Geometry, config: EMConfig) -> float:
    """Radius of the shift search, working px: ``--shift-range``, or 10 % of the box."""
    return (0.1 * geom.box if config.shift_range_px is None else config.shift_range_px) * geom.work_box / geom.box


def shift_grid(geom: Geometry, config: EMConfig, device, step: float) -> Tensor:
    """Shifts (x, y) in working px within a disc of the search range on a lattice of ``step`` working px, (T, 2)."""
    rng = shift_range(geom, config)
    n = int(math.floor(rng / step + 1e-9))
    k = torch.arange(-n, n + 1, device=device, dtype=torch.float32) * step
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    keep = xx**2 + yy**2 <= rng**2 + 1e-6
    return torch.stack([xx[keep], yy[keep]], dim=1)


def _against_rival(res: EStepResult, search: Tensor, K: int, scale: Tensor, log_prior: Tensor, temperature: float,
                   rival: Tensor) -> EStepResult:
    """A hard E-step over classes ``search`` only, in all K classes' indices: each particle keeps its
    entry only where its best pose scores above ``rival`` (its best pose in the other classes)."""
    best = (scale * res.best_cross - 0.5 * scale * scale * res.best_norm) / temperature + log_prior[res.best_k]
    keep = (best > rival)[res.entry_i]
    post = torch.zeros((len(scale), K), dtype=res.class_post.dtype, device=scale.device)
    post[:, search] = res.class_post
    return replace(
        res, class_post=post, best_k=search[res.best_k], entry_i=res.entry_i[keep], entry_t=res.entry_t[keep],
        entry_k=search[res.entry_k[keep]], entry_r=res.entry_r[keep], entry_w=res.entry_w[keep],
    )


class Engine(ClassMoves):
    """State and steps of one classification run (use :func:`run_em`)."""

    def __init__(self, particles: ParticleSet, config: EMConfig, device: str = "cpu") -> None:
        config.validate()
        tune_allocator()
        n = len(particles)
        if n < config.n_classes:
            raise Cryo2DError(f"{particles.source.name}: {n} particles is fewer than the {config.n_classes} classes asked for")
        if config.use_ctf and particles.ctf is None:
            raise Cryo2DError(f"{particles.source.name}: no CTF parameters (use --no-ctf to classify without CTF)")
        if not config.input_shifts:
            particles = replace(particles, prior_shift_px=None)
        self.particles = particles
        self.config = config
        self.device = torch.device(device)
        self.geom = check_settings(particles, config)
        g = self.geom
        self.n_shells = g.work_box // 2 + 1
        self.mpts = disc_points(g.work_box, 0.0, g.r_max, half=True, device=self.device)
        # The particles (and their CTFs) at the M-step points.
        self.images = PointCache(particles, g, self.mpts.flat, self.device, use_ctf=config.use_ctf)
        self.mask = soft_mask(g.work_box, g.mask_inner_px, g.mask_outer_px, device=self.device)
        self.K = config.n_classes
        self.rng = np.random.default_rng(config.seed)
        self.state = st.new_state(n, self.K, len(self.mpts), self.n_shells, self.device)
        # The coarse search only ranks poses: bfloat16 where the hardware has it
        # (64 px, K = 20: 44 -> 41 s a job; benchmarks/README.md, Session 5), else int8 on
        # x86 CPUs with AVX2 (48-80 px sets 9-18 % faster than float32; session 48).
        self.coarse_dtype = coarse_dtype_for(self.device)
        self._setup_for, self._setup = None, None  # the last plan's pass set-up (_plan_setup)
        self._views = None  # (angle, classes, grids, rotated) of _masked_views

    # ---------------------------------------------------------------- helpers
    def _to_real(self, A: Tensor) -> Tensor:
        """(K, m) class transforms at the M-step points -> (K, B, B) real images."""
        return ifft2c(self._grid(A), real=True)

    def _to_points(self, images: Tensor) -> Tensor:
        """(K, B, B) real images -> (K, m) transforms at the M-step points."""
        return fft2c(images).flatten(1)[:, self.mpts.flat]

    def _grid(self, A: Tensor) -> Tensor:
        """(K, m) values at the M-step half-plane points -> (K, B, B) centred Hermitian grids."""
        return hermitian_grid(A, self.mpts, self.geom.work_box)

    def _chunk_size(self, plan: IterationPlan, grid: CoarseGrid | None = None) -> int:
        """Particles per E-step chunk: about :func:`chunk_budget` bytes of the E-step's intermediates."""
        if self.config.chunk_size:
            return int(self.config.chunk_size)
        T, KR, M = len(plan.shifts_px), self.K * len(plan.psi_rad), len(plan.points)
        if grid is None:
            per_particle = T * (16 * KR + 16 * M) + 8 * KR
        else:  # coarse images and scores, the fine stage's poses a candidate (its products
            # run a few particles at a time), and with a rotation table the candidates' rows
            Tc, KRc, Mc = len(grid.coarse_t), self.K * len(grid.coarse_r), len(grid.coarse_m)
            n_cand = self.K + N_CANDIDATES
            n_poses = 3 * (2 * SHIFT_REACH + 1) ** 2
            per_particle = Tc * (8 * KRc + 16 * Mc) + n_cand * n_poses * 64 + 8 * KR  # measured, with the allocator
            if self._dense_references(plan) is not None:
                per_particle += n_cand * 3 * 12 * M
        budget, most = chunk_budget(self.device)
        return int(max(1, min(most, budget // per_particle)))

    def _ctf2_shell(self) -> Tensor | None:
        """Mean s² · c² per shell of the class sums (rotationally averaged); None before anything is summed."""
        s = self.state
        total = float(s.counts.sum())
        if total <= 0:
            return None
        return shell_mean(s.den.sum(dim=0) / total, self.mpts.shell, len(s.sigma2_shell))

    @staticmethod
    def _image_power(plan: IterationPlan, inv_sig: Tensor) -> Tensor | None:
        """The images' expected power E|X · c · w|² at the E-step points (``inv_sig`` = w / σ²), for
        the int8 coarse product's balance (:func:`coarse_references`): noise power σ² times the
        plan's mean CTF² at the point's shell times (w / σ²)². The plan carries the CTF² (int8
        only, :meth:`plan`; None otherwise), so a shard on a Dask worker, whose engine has no
        class sums, balances as the client does."""
        if plan.ctf2_shell is None:
            return None
        return plan.ctf2_shell[plan.points.shell] * inv_sig * plan.points.weight

    def _dense_references(self, plan: IterationPlan) -> int | None:
        """None when a pass's rotated references fit :func:`refs_budget`; else how many classes'
        rows a :class:`RotationTable` makes once (the other classes' rows are sampled per chunk)."""
        per_class, budget = len(plan.psi_rad) * len(plan.points), refs_budget(self.device)  # values per class
        if self.K * per_class * 12 <= budget:
            return None
        return min(self.K, budget // (8 * per_class))

    def plan(self, iteration: int, online: bool) -> IterationPlan:
        """Search grid for an iteration from the current class resolution."""
        g, cfg = self.geom, self.config
        s = self.state
        r_res = min(s.r_res_sums + _RES_MARGIN, s.r_res + _DISTINCT_MARGIN)
        floor = min(g.r_align, max(g.r_min_align + 3.0, 0.35 * g.r_align))
        r_cur = float(min(g.r_align, max(floor, r_res)))
        step = cfg.psi_step_deg if cfg.psi_step_deg is not None else auto_psi_step(r_cur, g)
        t_step = shift_step(r_cur, g, cfg)
        temperature = temperature_at(cfg, iteration) if online else 1.0
        return IterationPlan(
            r_cur=r_cur,
            psi_rad=psi_grid(step, device=self.device),
            shifts_px=shift_grid(g, cfg, self.device, t_step),
            shift_step=t_step,
            points=disc_points(g.work_box, g.r_min_align, r_cur, half=True, device=self.device),
            temperature=temperature,
            r_mstep=_MSTEP_RADIUS * r_cur + 4.0 if online else math.inf,
            ctf2_shell=self._ctf2_shell() if self.coarse_dtype == torch.int8 else None,
        )

    # ---------------------------------------------------------------- init
    def start_sample_size(self) -> int:
        """Particles a start reads: 20 a class (fewer with smaller batches), at least 1,000, at most all."""
        n = len(self.particles)
        return min(n, max(self.K * min(self.config.batch_size_per_class, 20), min(n, 1000)))

    def initialise(self) -> None:
        """Noise from the image backgrounds; classes from random subsets at random angles."""
        s, n = self.state, len(self.particles)
        m = self.start_sample_size()
        idx = np.sort(self.rng.choice(n, size=m, replace=False))
        labels = torch.from_numpy(np.arange(m) % self.K)[torch.from_numpy(self.rng.permutation(m))].to(self.device)
        # Random angles rounded to a grid of _INIT_PSI_STEP: rows a quarter turn apart share a back-rotation.
        grid = psi_grid(_INIT_PSI_STEP, device=self.device)
        turns = np.rint(self.rng.uniform(0, 2 * np.pi, size=m) / (2 * np.pi) * len(grid)).astype(np.int64) % len(grid)
        psi = grid[torch.from_numpy(turns).to(self.device)]
        sums, sig = self._read_fixed(idx, labels, psi, with_noise=True, grid=grid)
        if not bool((sig[1:] > 0).any()):  # no noise to model: the classes would be 0 / 0
            which = "every image is" if m == n else f"all {m} images read for the starting classes are"
            raise Cryo2DError(f"{self.particles.source.name}: {which} constant (no pixel varies); nothing to classify")
        s.sigma2_shell = self._noise_model(sig)
        num, den, counts = sums
        s.num, s.den, s.counts = num, den, counts
        self._update_classes(allow_recenter=False)

    def start_from(self, idx: np.ndarray, labels: Tensor, psi: Tensor, shifts: Tensor, sigma2_shell: Tensor,
                   grid: Tensor | None = None) -> None:
        """Starting classes from particles ``idx`` with classes, angles and shifts given (:mod:`cryo2d.em.start`).

        labels : (b,) classes 0 .. K-1; psi : (b,) radians; shifts : (b, 2) working px (as
        :meth:`pass_over` gives them); sigma2_shell : the noise model to start from; grid: the
        angle grid that ``psi`` lies on (:meth:`_read_fixed`).
        """
        s = self.state
        s.sigma2_shell = sigma2_shell.to(self.device).clone()
        (num, den, counts), _ = self._read_fixed(idx, labels, psi, shifts_px=shifts, cached=True, grid=grid)
        s.num, s.den, s.counts = num, den, counts
        self._update_classes(allow_recenter=False)

    def _noise_model(self, sig_shell: Tensor) -> Tensor:
        if self.config.white_noise:
            return torch.full_like(sig_shell, float(sig_shell[1:].mean()))
        return sig_shell.clamp(min=float(sig_shell[1:].mean()) * 1e-4)

    def _read_fixed(self, idx: np.ndarray, labels: Tensor, psi: Tensor, *, n_classes: int | None = None,
                    shifts_px: Tensor | None = None, scale: Tensor | None = None, with_noise: bool = False,
                    group: int | None = None, by_angle: bool = False, cached: bool = False, grid: Tensor | None = None):
        """Sums for particles with a given class and angle each: starting and re-seeded classes.

        The images are read ``_INIT_READ`` at a time: they are read at the full
        box here, so one read of them all set the peak RSS (256 px, K = 20:
        3,449 MB with the starting classes' 1,000 images and a re-seeded class
        read in one go each, 1,635 MB read 256 at a time; benchmarks/README.md,
        session 11). Each read is summed in groups of 64e6 / (12 m K)
        particles. The groups bounded the dense K rows per particle that the
        sums once held (4.6 GB for the starting classes at K = 50, 128 px);
        since ``PoseSums`` makes room for one row per particle they no longer
        bound anything, but they fix the float summation order: one group
        per read gives other classes (hard set, seed 0: NCC 0.901 -> 0.891).

        Parameters
        ----------
        idx : (b,) particle indices; labels : (b,) classes; psi : (b,) angles (radians)
        n_classes : int, optional
            Classes in the sums (default K).
        shifts_px : (b, 2) tensor, optional
            Shifts undone first (working px).
        scale : (b,) tensor, optional
            Per-particle scale (default 1).
        group : int, optional
            Particles per group of sums (default as above: the starting
            classes' summation order).
        by_angle : bool
            Sum a group's particles of the same class and angle before the
            back-rotation (one rotation per pair, not per particle; another
            float summation order).
        grid : (R,) tensor, optional
            A grid of angles (:func:`psi_grid`) that every angle of ``psi``
            lies on: a group's particles of one class and angle are summed
            before their back-rotation, and rows a quarter (or half) turn
            apart are back-rotated at once (:class:`PoseSums`). Angles off
            the grid go one by one, as without it.
        with_noise : bool
            Also return the images' mean noise spectrum (:func:`noise_spectrum`), else None.
        cached : bool
            Read the particles through the run's :class:`PointCache` (classes
            re-seeded from a batch: the same values, without reading them at
            the full box again); not with ``with_noise``.

        Returns
        -------
        (num, den, counts), noise spectrum or None
        """
        K = n_classes or self.K
        rows = group or max(1, int(64e6 // (12 * len(self.mpts) * K)))  # particles per group of sums (the summation order)
        sums, sig_sum = None, None
        from_cache = cached and not with_noise
        if from_cache and shifts_px is not None:  # the frequencies of _deshift_grid at the points
            freqs = freq_grid(self.geom.work_box, device=self.device).reshape(-1, 2)[self.mpts.flat]
        for start in range(0, len(idx), _INIT_READ):
            sl = slice(start, start + _INIT_READ)
            ids, lab, ang = idx[sl], labels[sl], psi[sl]
            if from_cache:
                Xm, cm = self.images.read_with_ctf(ids)
                if shifts_px is not None:
                    Xm = Xm * deshift_phases(freqs, shifts_px[sl])
            else:
                X = load_batch(self.particles, ids, self.geom, self.device)
                if with_noise:
                    sig = noise_spectrum(X, self.geom, self.n_shells) * X.shape[0]
                    sig_sum = sig if sig_sum is None else sig_sum + sig
                if shifts_px is not None:
                    X = X * self._deshift_grid(shifts_px[sl])
                Xm = X.flatten(1)[:, self.mpts.flat]
                cm = batch_ctf(self.particles, ids, self.geom, self.config.use_ctf, self.device, flat=self.mpts.flat)
                del X
                if shifts_px is None:  # what the first pass would read again (the starting classes' particles)
                    self.images.keep(ids, Xm, cm)
            part = None
            for g in range(0, len(ids), rows):
                gs = slice(g, g + rows)
                sc = None if scale is None else scale[sl][gs]
                part = _add_sums(part, self._accumulate_group(Xm[gs], cm[gs], lab[gs], ang[gs], K, sc, by_angle, grid))
            sums = _add_sums(sums, part)
        return sums, (sig_sum / len(idx) if with_noise else None)

    def _accumulate_group(self, Xm: Tensor, cm: Tensor, labels: Tensor, psi: Tensor, K: int,
                          scale: Tensor | None = None, by_angle: bool = False, grid: Tensor | None = None):
        """Sums of particles ``Xm`` (b, m) with CTFs ``cm`` (b, m) at the M-step points, each at its class and angle.

        ``by_angle`` and ``grid``: see :meth:`_read_fixed`."""
        b = len(Xm)
        ar = torch.arange(b, device=self.device)
        rot = ar  # each particle's rotation: its own angle, or its row in the distinct angles or the grid
        if grid is not None:
            err, at = wrapped(psi[:, None].double() - grid[None, :].double()).abs().min(dim=1)
            if b and float(err.max()) <= 1e-6:
                psi, rot = grid, at
        elif by_angle:
            psi, rot = torch.unique(psi, return_inverse=True)
        sums = PoseSums(K, psi, self.mpts, self.geom.work_box, self.config.zeropad, self.device, max_rows=b)
        one = torch.ones(b, device=self.device)
        post = torch.zeros((b, K), device=self.device)
        post[ar, labels] = 1.0
        res = EStepResult(post, ar * 0, labels, rot, one, one, one, ar, ar * 0, labels, rot, one, one)
        sums.add(Xm, cm, one if scale is None else scale, torch.ones((1, len(self.mpts)), dtype=torch.complex64, device=self.device), res)
        num, den = sums.class_frame()
        return num, den, sums.counts

    # ---------------------------------------------------------------- written averages
    def refine_final_poses(self, rows: np.ndarray) -> None:
        """Angles and shifts of particles ``rows`` refined around their final grid poses.

        Finer steps in the last search gave the same classes at ``max_res``
        (session 16), but the averages written beyond it are blurred by the
        grid's steps (:mod:`cryo2d.em.refine`). Scored as the last
        iteration's E-step did (its points, masked classes and noise model);
        shifts stay within the search range, and a particle of the
        empty-box class keeps its pose.
        """
        s, cfg, g, dev = self.state, self.config, self.geom, self.device
        rows = rows[s.class_index[rows] != s.null_class]
        if len(rows) == 0 or not s.history:
            return
        last = s.history[-1]
        r_cur = float(last["align_radius"])
        points = disc_points(g.work_box, g.r_min_align, r_cur, half=True, device=dev)
        classes, inv_sig, at_points = self._scoring_inputs(points)
        for start in range(0, len(rows), _REFINE_CHUNK):
            ids = rows[start : start + _REFINE_CHUNK]
            X, ctf = (v[:, at_points] for v in self.images.read_with_ctf(ids))
            psi, shifts = refine_poses(
                X, ctf, torch.from_numpy(s.scale[ids]).float().to(dev), inv_sig, points.xy, g.work_box, classes,
                torch.from_numpy(s.class_index[ids]).to(dev), torch.from_numpy(s.psi_rad[ids]).float().to(dev),
                torch.from_numpy(s.shift_work[ids]).float().to(dev), math.radians(last["psi_step_deg"]),
                shift_step(r_cur, g, cfg), cfg.zeropad, max_shift_px=shift_range(g, cfg),
            )
            s.psi_rad[ids] = (psi % (2 * math.pi)).cpu().numpy()
            s.shift_work[ids] = shifts.cpu().numpy()

    def average_pass(self) -> Engine | None:
        """The classes rebuilt at ``config.average_res_angst`` from each particle's best class and pose.

        The search and the iterations' classes stop at ``max_res`` (6 Å by
        default, as CryoSPARC's); RELION's averages go to Nyquist, and on
        clean data with fine pixels they matched the true views better
        (``highsnr`` preset, benchmarks/README.md, session 16). This pass
        first refines each particle's angle and shift around its grid pose
        (:meth:`refine_final_poses`: the poses written are those), then
        reads every assigned particle once more at the finer box, sums it
        at its class, angle, shift and scale, and solves each class as
        the M-step does (Wiener filter with the class's own signal prior,
        then clamp-solvent and non-negativity). The noise model is the run's
        within the band it refined; beyond it, the images' background
        spectrum (:func:`noise_spectrum` of ``_NOISE_READ`` particles
        spread over the set) scaled by its mean ratio to the run's over the
        outer half of that band. White noise keeps the run's one σ².
        Particles are summed in order of angle, then class, so that a group
        of them holds few (class, angle) pairs to back-rotate (20,000 x 128
        px, K = 50: 32 -> 14 s, with the noise from a subset).

        The default (``average_res_angst`` None: Nyquist) runs only where it
        widens the classes' Fourier radius by ``_AVERAGE_GAIN`` or more, and
        widens it only where the best class reaches ``_AVERAGE_REACH`` of the
        run's radius (its SSNR falls to 1 there): a class that stops well
        inside the band has nothing beyond it, and the last iteration's
        classes are written as they are. Summing their particles again at
        single refined poses on the run's own box lowered the median NCC
        (haemoglobin at 64 px and 2 Å/px, classes at 13-18 Å: 0.902 -> 0.891
        and 0.871 -> 0.856): where the poses are uncertain, the last pass
        spreads each particle over its class's probable poses, which a
        single pose does not (benchmarks/README.md, session 36).

        Returns
        -------
        Engine or None
            An engine at the finer box holding the sums, the noise model and
            the classes; None when there is no pass (the poses are then
            unchanged).
        """
        cfg, s = self.config, self.state
        res = cfg.average_res_angst if cfg.average_res_angst is not None else 2.0 * self.geom.pixel_size_angst
        if res >= cfg.max_res_angst:
            return None
        fine_cfg = replace(cfg, max_res_angst=res)
        least = self.geom.r_max * _AVERAGE_GAIN if cfg.average_res_angst is None else self.geom.r_max + 0.5
        if make_geometry(self.geom.box, self.geom.pixel_size_angst, fine_cfg).r_max < least:
            return None
        if cfg.average_res_angst is None and s.r_res < _AVERAGE_REACH * self.geom.r_max:
            return None
        fine = Engine(self.particles, fine_cfg, self.device)
        assigned = np.nonzero(s.class_index >= 0)[0]
        self.refine_final_poses(assigned[np.argsort(s.class_index[assigned], kind="stable")])
        # By angle, then class: a group of the pass holds few distinct (class, angle) pairs to back-rotate.
        rows = assigned[np.lexsort((s.class_index[assigned], s.psi_rad[assigned]))]
        dev = self.device
        labels = torch.from_numpy(s.class_index[rows]).to(dev)
        psi = torch.from_numpy(s.psi_rad[rows]).float().to(dev)
        shifts = torch.from_numpy(s.shift_work[rows] * (fine.geom.work_box / self.geom.work_box)).float().to(dev)
        scale = torch.from_numpy(s.scale[rows]).float().to(dev)
        (num, den, counts), _ = fine._read_fixed(rows, labels, psi, shifts_px=shifts, scale=scale, group=_INIT_READ,
                                                 by_angle=True)
        sigma2 = s.sigma2_shell.float()
        refined = torch.nonzero(s.noise_cnt > 0).flatten()
        if cfg.white_noise:
            fine.state.sigma2_shell = torch.full((fine.n_shells,), float(sigma2[1]), device=dev)
        else:
            some = assigned[np.linspace(0, len(assigned) - 1, min(len(assigned), _NOISE_READ)).astype(np.int64)]
            background = 0.0
            for start in range(0, len(some), _INIT_READ):
                part = some[start : start + _INIT_READ]
                X = load_batch(self.particles, part, fine.geom, dev)
                background = background + noise_spectrum(X, fine.geom, fine.n_shells) * (len(part) / len(some))
            last = int(refined.max()) if len(refined) else 0
            outer = refined[refined >= last // 2]
            ratio = float((sigma2[outer] / background[outer].clamp(min=1e-30)).mean()) if len(outer) else 1.0
            model = background * ratio
            model[refined] = sigma2[refined]
            fine.state.sigma2_shell = fine._noise_model(model)
        fine.state.num, fine.state.den, fine.state.counts = num, den, counts
        fine.state.null_class = s.null_class
        fine._update_classes(allow_recenter=False)
        return fine

    # ---------------------------------------------------------------- classes
    def _update_classes(self, allow_recenter: bool) -> None:
        """Wiener solve from the current sums, then clamp/non-negativity/re-centring, priors, resolution."""
        s, cfg = self.state, self.config
        s.tau2, A = self._wiener(s.num, s.den)
        if cfg.clamp_solvent or cfg.non_negative:
            img = self._to_real(A)
            if cfg.clamp_solvent:
                img = img * self.mask
            if cfg.non_negative:
                img = img.clamp(min=0)
            A = self._to_points(img)
        if allow_recenter and cfg.recenter:
            A = self._recenter(A)
        if s.null_class >= 0:
            A[s.null_class] = 0
        s.A = A
        # Online, batches that cover most of the data set put each particle in
        # the running sums several times (weight up to about 1/eta batches),
        # and repeated noise does not average out: the SSNR of the sums rises
        # with the iterations, not with the classes (96 px, K = 50: Nyquist
        # online, 23 Å in the full pass). r_res is the resolution of the sums
        # scaled to the distinct particles; r_res_sums that of the sums as
        # they are. Full iterations count each particle once: both agree.
        occupied = s.counts > 0.5
        if s.null_class >= 0:
            occupied[s.null_class] = False
        s.r_res_sums = self._resolution(self.class_ssnr(distinct=False), occupied)[1]
        s.res_shell, s.r_res = self._resolution(self.class_ssnr(), occupied)
        # Uniform class priors: priors proportional to occupancy let large
        # classes swallow rare views and junk (measured: view purity 0.78
        # with them, 0.88 without, on the 48 px test set).
        s.log_prior = torch.zeros_like(s.log_prior)

    def _search_classes(self, which: Tensor | None = None) -> Tensor:
        """(K, m) the classes as the search sees them: each masked by its own support (``auto_mask``) or the circle.

        ``which`` (int64 indices): only those classes, in that order.
        """
        real = self._to_real(self.state.A if which is None else self.state.A[which])
        return self._to_points(real * (self._support_masks(real) if self.config.auto_mask else self.mask))

    def _support_masks(self, img: Tensor, circle: Tensor | None = None) -> Tensor:
        """Soft masks (K, B, B) around each class's own density, within the circular mask.

        Noise that a class average carries outside its particle correlates
        with the noise of the images and pulls the search; RELION masks
        the references with the particle's diameter. Here each class masks
        itself: its density low-passed (sigma B / 24 px), the absolute
        value (particles white or black) thresholded at 15 % of its
        maximum, only the connected regions that reach half the maximum
        (the particle, not the noise blobs of a small class), dilated by
        B / 16 px, edge softened (sigma 1.5 px), times ``circle``. A class
        of zeros (the empty-box class) gets a zero mask. ``img`` is
        (K, B, B) real; ``circle`` (B, B) is the circular mask at that box
        (default ``self.mask``, the working box).
        """
        B = img.shape[-1]
        circle = self.mask if circle is None else circle
        f2 = torch.fft.fftfreq(B, device=img.device)[:, None] ** 2 + torch.fft.rfftfreq(B, device=img.device)[None, :] ** 2

        def blur(x: Tensor, sigma_px: float) -> Tensor:
            return torch.fft.irfft2(torch.fft.rfft2(x) * torch.exp(-2 * math.pi**2 * sigma_px**2 * f2), s=(B, B))

        density = blur(img * circle, B / _AUTO_BLUR).abs()
        peak = density.amax(dim=(1, 2), keepdim=True)
        support = _keep_strong_regions((density > _AUTO_MASK * peak) & (peak > 0), density, _AUTO_KEEP * peak)
        d = max(1, round(B / _AUTO_DILATE))
        # A (2d + 1)² maximum as two 1-D ones (the same values, a fifth of the work at 64 px).
        support = torch.nn.functional.max_pool2d(support[:, None], (1, 2 * d + 1), stride=1, padding=(0, d))
        support = torch.nn.functional.max_pool2d(support, (2 * d + 1, 1), stride=1, padding=(d, 0))[:, 0]
        return blur(support, _AUTO_SOFT).clamp(0, 1) * circle

    def class_ssnr(self, distinct: bool = True) -> Tensor:
        """(K, n_shells) SSNR of the current sums; ``distinct``: scaled to each particle counted once."""
        s, cfg = self.state, self.config
        sigma2 = s.sigma2_shell[self.mpts.shell]
        den, tau2 = s.den, s.tau2
        share = min(1.0, len(self.particles) / max(float(s.counts.sum()), 1e-12)) if distinct else 1.0
        if share < 1.0:
            den = den * share
            tau2 = estimate_tau2(s.num * share, den, sigma2, self.mpts.shell, self.n_shells, cfg.tau2_fudge)
        return ssnr(den, sigma2, tau2, self.mpts.shell, self.n_shells, cfg.tau2_fudge)

    def _resolution(self, snr: Tensor, occupied: Tensor) -> tuple[Tensor, float]:
        """Per-class resolution shells (K,) and the best over occupied classes (Fourier px), within the
        alignment band: under a --min-align-res high-pass the low shells' SSNR can be about 0 (45 Å on
        48 px at 7.6 Å/px: shells 3-7), which held the search at its floor radius for the whole run."""
        shells = resolution_shell(snr, start=math.ceil(self.geom.r_min_align + 0.5))  # the first shell wholly in the band
        return shells, float(shells[occupied].max()) if bool(occupied.any()) else 1.0

    def _recenter(self, A: Tensor) -> Tensor:
        """Shift each class (and its running sums) to its centre of mass above threshold."""
        s, cfg = self.state, self.config
        img = self._to_real(A) * self.mask
        thr = cfg.recenter_threshold * img.flatten(1).amax(dim=1).clamp(min=1e-12)
        w = torch.where(img > thr[:, None, None], img, torch.zeros_like(img))
        B = self.geom.work_box
        k = torch.arange(B, device=self.device, dtype=torch.float32) - B // 2
        tot = w.sum(dim=(1, 2)).clamp(min=1e-12)
        com = torch.stack([(w.sum(dim=1) * k).sum(dim=1) / tot, (w.sum(dim=2) * k).sum(dim=1) / tot], dim=1)
        com = torch.where(w.sum(dim=(1, 2), keepdim=False)[:, None] > 0, com, torch.zeros_like(com))
        # Shifting the class by -com multiplies its transform by exp(+2πi f·com).
        ph = torch.polar(
            torch.ones(len(com), len(self.mpts), device=self.device),
            2 * math.pi * (com @ (self.mpts.xy / B).T),
        )
        s.num = s.num * ph
        return A * ph

    def _wiener(self, num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
        """Signal priors τ² (rows, n_shells) and Wiener averages (rows, m) of class sums ``num``, ``den``."""
        sigma2 = self.state.sigma2_shell[self.mpts.shell]
        tau2 = estimate_tau2(num, den, sigma2, self.mpts.shell, self.n_shells, self.config.tau2_fudge)
        return tau2, solve_classes(num, den, sigma2, tau2, self.mpts.shell)

    def _solve_one(self, k: int) -> None:
        """Signal prior and Wiener average of class ``k`` alone from its sums (no constraints, no re-centring)."""
        s = self.state
        tau2, A = self._wiener(s.num[k : k + 1], s.den[k : k + 1])
        s.tau2[k], s.A[k] = tau2[0], A[0]

    def _scoring_inputs(self, points: PointSet) -> tuple[Tensor, Tensor, Tensor]:
        """What scoring particles at given poses on ``points`` needs: the search's classes oversampled,
        w / σ² at the points, and the points' columns among the M-step points (the cache's)."""
        s = self.state
        classes = oversample(self._grid(self._search_classes()), self.config.zeropad)
        inv_sig = points.weight / s.sigma2_shell[points.shell]
        return classes, inv_sig, torch.searchsorted(self.mpts.flat, points.flat)

    def _deshift_grid(self, shifts_px: Tensor) -> Tensor:
        """(b, B, B) phases exp(+2πi f·t) that undo per-particle shifts t (working px)."""
        B = self.geom.work_box
        return deshift_phases(freq_grid(B, device=self.device).reshape(-1, 2), shifts_px).view(-1, B, B)

    # ---------------------------------------------------------------- E/M pass
    def _plan_setup(self, plan: IterationPlan) -> tuple:
        """What a pass needs from ``plan`` alone, made once per plan (an iteration's main and growing passes share it).

        Returns (phases, sub, mp, phases_m, grid, e_img, m_img): the de-shift
        phases at the E-step points; the M-step points this pass sums (``sub``,
        their indices, None for all; ``mp``, the points) and their phases; the
        coarse grid (None: exhaustive search); and the columns of the E-step
        and summed points among the cached M-step points.
        """
        if self._setup_for is not None and _same_grid(self._setup_for, plan):
            return self._setup
        g, cfg = self.geom, self.config
        R = len(plan.psi_rad)
        phases = deshift_phases(plan.points.xy / g.work_box, plan.shifts_px)
        within = self.mpts.xy.norm(dim=1) <= plan.r_mstep
        sub = None if bool(within.all()) else torch.nonzero(within).squeeze(1)
        mp = self.mpts if sub is None else self.mpts.subset(sub)  # the points this pass sums
        phases_m = deshift_phases(mp.xy / g.work_box, plan.shifts_px)
        grid = None
        # The coarse stage needs enough resolution to rank poses (≥ 12 Fourier
        # px): below twice that it searches the coarse poses at the full
        # radius (64 px, K = 20: 136 -> 54 s a job; benchmarks/README.md).
        r_coarse = max(g.r_min_align + 2.0, 12.0, 0.5 * plan.r_cur)
        if r_coarse > 0.6 * plan.r_cur:
            r_coarse = plan.r_cur
        if cfg.coarse_to_fine and R >= 4 and len(plan.shifts_px) >= 9:
            grid = coarse_subgrid(plan.shifts_px, plan.shift_step, R, plan.points.xy.norm(dim=1), r_coarse)
        # The images and CTFs are read at the M-step points (sorted flat indices; the E-step's are among them).
        e_img = torch.searchsorted(self.mpts.flat, plan.points.flat)
        m_img = torch.searchsorted(self.mpts.flat, mp.flat)
        self._setup_for, self._setup = plan, (phases, sub, mp, phases_m, grid, e_img, m_img)
        return self._setup

    def pass_over(self, idx: np.ndarray, plan: IterationPlan, mode: str, iteration: int, classes: Tensor | None = None,
                  rival: Tensor | None = None, noise: bool = True):
        """E-step over particles ``idx`` (in chunks) and M-step sums.

        Returns the new sums (num, den, counts, noise) and per-particle results.
        One shard (:meth:`pass_shard`) and its reduction (:meth:`reduce_pass`):
        a distributed pass (``cryo2d.em.distributed``) runs the same two steps
        with several shards. ``classes``, ``rival``, ``noise``: see :meth:`pass_shard`.
        """
        return self.reduce_pass([self.pass_shard(idx, plan, mode, classes, rival, noise)])

    def reduce_pass(self, shards: list[ShardSums]):
        """Add the shards' sums in list order and make the robust noise sums over all of them.

        Returns
        -------
        sums : (num, den, counts, noise_sum, noise_cnt)
            As (K, m) complex, (K, m) float, (K,) / (n_shells,) / (n_shells,) float64
            tensors on the engine's device.
        per : dict of numpy arrays
            Per-particle results, the shards concatenated in order.
        """
        dev = self.device
        num, den, counts = (x.to(dev) for x in (shards[0].num, shards[0].den, shards[0].counts))
        for sh in shards[1:]:
            num, den, counts = num + sh.num.to(dev), den + sh.den.to(dev), counts + sh.counts.to(dev)
        per = {k: np.concatenate([sh.per[k] for sh in shards]) for k in shards[0].per}
        shell_resid = torch.cat([sh.shell_resid.to(dev) for sh in shards])
        noise_sum, noise_cnt = self._robust_noise_sums(shell_resid, shards[0].shell_points.to(dev), per["chi2"])
        return (num, den, counts, noise_sum, noise_cnt), per

    def pass_shard(self, idx: np.ndarray, plan: IterationPlan, mode: str, classes: Tensor | None = None,
                   rival: Tensor | None = None, noise: bool = True) -> ShardSums:
        """E-step and linear M-step sums of particles ``idx``; reads only their images.

        Uses ``state.A``, ``sigma2_shell``, ``log_prior`` and ``scale[idx]``.
        With ``classes`` (int64 indices), the E-step still ranks every class
        but the M-step sums and counts hold only those classes (zero for the
        rest): growing a few new classes need not back-rotate all K · R sums
        (:meth:`_grow_seeds`; 64 px, K = 20: 4.9 of a job's 52 s). With
        ``rival`` as well (hard mode; (len(idx),) log-probabilities of each
        particle's best pose in the other classes), the E-step searches only
        ``classes``, and a particle joins its best of them only where that
        pose scores above its rival (the passes that grow classes in a 96 px,
        K = 30 job: 10.5 -> 6.2 s). ``noise=False`` skips the residual at each
        particle's best pose: ``chi2`` and the noise sums come back zero (for
        passes that do not update the noise model).
        """
        s, g, cfg = self.state, self.geom, self.config
        dev = self.device
        search = classes if rival is not None else None  # the E-step's classes (None: all)
        masked = self._search_classes(search)
        log_prior, null_class = s.log_prior, s.null_class
        if search is not None:
            log_prior = s.log_prior[search]
            at = torch.nonzero(search == s.null_class).flatten()
            null_class = int(at[0]) if len(at) else -1
        n_dense = self._dense_references(plan)
        if n_dense is None:
            refs = rotate_classes(self._grid(masked), plan.points.xy, plan.psi_rad, cfg.zeropad)
            # once per pass, not per chunk; on half-turn pairs rows r + R/2 have the power of rows r
            power = refs[:, : len(plan.psi_rad) // 2 if half_turn_pairs(plan.psi_rad) else None].abs().square()
        else:  # the classes that fit made once, the others' rows sampled when a chunk needs them
            refs = RotationTable(self._grid(masked), plan.points.xy, plan.psi_rad, cfg.zeropad, n_dense)
            power = None
        inv_sig = plan.points.weight / s.sigma2_shell[plan.points.shell]
        phases, sub, mp, phases_m, grid, e_img, m_img = self._plan_setup(plan)
        coarse = None if grid is None else coarse_references(
            refs, grid, power, self.coarse_dtype, pairs=paired_coarse_ok(plan.psi_rad, grid, self.coarse_dtype),
            image_power=self._image_power(plan, inv_sig))
        if noise:
            G_full = oversample(self._grid(s.A), cfg.zeropad)
            G_cplx = torch.view_as_complex(G_full.permute(0, 2, 3, 1))  # (K, p, p//2 + 1), no copy
            w_sig = mp.weight / s.sigma2_shell[mp.shell]
        # Hard mode: one entry, so at most one (class, rotation) row, per particle.
        max_rows = len(idx) * (1 if mode == "hard" else MAX_ENTRIES)
        sums = PoseSums(self.K, plan.psi_rad, mp, g.work_box, cfg.zeropad, dev, max_rows=max_rows)
        shell_resid = []  # per particle: residual power per shell
        chunk = self._chunk_size(plan, grid)
        fine_chunk = fine_chunk_for(dev)
        read = max(chunk, 256)
        out = {k: [] for k in ("k", "psi", "shift", "max_prob", "post", "ess", "cross", "norm", "chi2")}
        for start in range(0, len(idx), read):
            ridx = idx[start : start + read]
            X_all, C_all = self.images.read_with_ctf(ridx)
            for c0 in range(0, len(ridx), chunk):
                cidx = ridx[c0 : c0 + chunk]
                X, C = X_all[c0 : c0 + chunk], C_all[c0 : c0 + chunk]
                scale = torch.from_numpy(s.scale[cidx]).float().to(dev)
                args = (X[:, e_img], C[:, e_img], inv_sig, refs, phases, log_prior, scale)
                if grid is None:
                    res = e_step(*args, temperature=plan.temperature, mode=mode, refs_power=power, null_class=null_class)
                else:
                    res = e_step_coarse_to_fine(
                        *args, grid, temperature=plan.temperature, mode=mode, refs_power=power, coarse_refs=coarse,
                        null_class=null_class, fine_chunk=fine_chunk,
                        prune=(PRUNE_NATS, PRUNE_SIGNAL) if search is None and cfg.force_max_effective else None,
                    )
                if search is not None:
                    mine = rival[start + c0 : start + c0 + len(cidx)]
                    res = _against_rival(res, search, self.K, scale, log_prior, plan.temperature, mine)
                Xm, Cm = X[:, m_img], C[:, m_img]
                sums.add(Xm, Cm, scale, phases_m, res if classes is None else res.only_classes(classes))
                # Noise: residual at the best pose, per shell.
                if not noise:
                    chi2 = torch.zeros(len(cidx), device=dev)
                    per_shell = torch.zeros((len(cidx), self.n_shells), device=dev, dtype=torch.float64)
                elif kernels.available(dev):
                    chi2, per_shell = kernels.best_pose_residual(
                        G_cplx, res.best_k, plan.psi_rad[res.best_r], res.best_t, scale, Xm, Cm, phases_m, mp.xy,
                        cfg.zeropad, w_sig, mp.shell, self.n_shells)
                else:
                    pts = rotated_points(mp.xy, -plan.psi_rad[res.best_r]).unsqueeze(1)
                    Zb = sample_half(G_full[res.best_k], pts, cfg.zeropad)[:, :, 0]
                    Zb = torch.complex(Zb[:, 0], Zb[:, 1])
                    resid = (Xm * phases_m[res.best_t] - scale[:, None] * Cm * Zb).abs() ** 2
                    chi2 = (resid * w_sig).sum(dim=1)
                    per_shell = torch.zeros((len(cidx), self.n_shells), device=dev, dtype=torch.float64)
                    per_shell.index_add_(1, mp.shell, resid.double())
                # A blank image (zero after normalisation: a padded or zero-filled box) holds no noise to
                # measure; -1 leaves it out of the noise model (_robust_noise_sums), where a stack half of
                # such boxes drew every shell's σ² to its floor.
                chi2 = torch.where(Xm.abs().amax(dim=1) > 0, chi2, torch.full_like(chi2, -1.0))
                out["chi2"].append(chi2)
                shell_resid.append(per_shell)
                p = res.class_post
                # soft and max_pose: the most probable class; hard and hard_class: the class of the written
                # pose (hard_class: estep.choose_class's, which keeps an empty box only where the empty-box
                # class holds half its posterior)
                chosen = p.argmax(dim=1) if mode in ("soft", "max_pose") else res.best_k
                out["k"].append(chosen)
                out["psi"].append(plan.psi_rad[res.best_r])
                out["shift"].append(plan.shifts_px[res.best_t])
                out["max_prob"].append(res.max_prob)
                out["post"].append(p.gather(1, chosen[:, None])[:, 0])
                out["ess"].append(1.0 / (p * p).sum(dim=1))
                out["cross"].append(res.best_cross)
                out["norm"].append(res.best_norm)
        num, den = sums.class_frame()
        if sub is not None:  # zero sums beyond r_mstep
            num = torch.zeros((self.K, len(self.mpts)), dtype=num.dtype, device=dev).index_copy_(1, sub, num)
            den = torch.zeros((self.K, len(self.mpts)), dtype=den.dtype, device=dev).index_copy_(1, sub, den)
        per = {k: torch.cat(v).cpu().numpy() for k, v in out.items()}
        shell_points = torch.bincount(mp.shell, minlength=self.n_shells).double()
        return ShardSums(num, den, sums.counts, torch.cat(shell_resid), shell_points, per)

    def _robust_noise_sums(self, shell_resid: Tensor, shell_points: Tensor, chi2: np.ndarray) -> tuple[Tensor, Tensor]:
        """Noise sums per shell over the particles the model fits typically (``shell_points`` per particle and shell).

        Particles whose normalised residual is an outlier (above median +
        5 × MAD: ice, aggregates, overlapping neighbours) are left out, so
        that junk does not inflate the noise model and blunt the alignment.
        Of the rest, each shell leaves out the particles whose residual there
        no noise explains (:func:`~cryo2d.em.mstep.robust_shell_noise`;
        from ``_ROBUST_MIN`` particles): ice whose excess power lies at the
        few points of the lowest shells passes the test on the whole residual
        (haemoglobin at 64 px: 148 of 150 ice images), and it tripled σ² at
        shell 1 (69,500 against 21,100 without it; benchmarks/README.md,
        session 52).
        """
        measured = chi2 >= 0  # not a blank image (chi2 -1: pass_shard)
        if not measured.any():
            return shell_resid.new_zeros(shell_resid.shape[1]), shell_points * 0.0
        med = np.median(chi2[measured])
        mad = np.median(np.abs(chi2[measured] - med)) * 1.4826
        typical = torch.from_numpy(measured & (chi2 <= med + 5.0 * max(mad, 1e-12))).to(shell_resid.device)
        n = float(typical.sum())
        if n < _ROBUST_MIN:
            return shell_resid[typical].sum(dim=0), shell_points * n
        return robust_shell_noise(shell_resid[typical], shell_points) * shell_points * n, shell_points * n

    # ---------------------------------------------------------------- one iteration
    def iterate(
        self, it: int, idx: np.ndarray | None = None, *, last: bool | None = None, pass_fn: Callable | None = None
    ) -> dict:
        """Run iteration ``it`` of the schedule (0-based) and return its log record.

        Online iterations (``it < n_online_iterations``) draw a random batch of
        ``batch_size_per_class × n_classes`` particles and fold its sums into
        the running sums; full iterations use ``idx`` (default: every particle)
        and replace the sums. ``last`` (default: ``it`` is the schedule's last
        iteration) makes the pass hard (``hard_last``) and skips re-centring.
        ``pass_fn`` has the signature of :meth:`pass_over` and stands in for it
        (e.g. a distributed pass).
        """
        s, cfg, n = self.state, self.config, len(self.particles)
        t0 = time.perf_counter()
        n_online, n_full = cfg.n_online_iterations, cfg.n_full_iterations
        total = n_online + max(n_full, 1)
        online = it < n_online
        if last is None:
            last = it == total - 1
        plan = self.plan(it, online)
        if online:
            size = min(n, cfg.batch_size_per_class * cfg.n_classes)
            idx = np.sort(self.rng.choice(n, size=size, replace=False))
        elif idx is None:
            idx = np.arange(n)
        every_pass_hard = cfg.force_max_effective and n >= MAX_POSE_BELOW * self.K
        if last and cfg.hard_last and (s.null_class >= 0 or not every_pass_hard):
            # hard_class: the empty-box class keeps only the particles that hold half their mass
            # there (estep.choose_class), in force-max runs of many particles too; without an
            # empty-box class those keep their hard pass (the class of the best pose).
            mode = "hard_class"
        elif every_pass_hard:
            mode = "hard"
        elif cfg.force_max_effective:
            mode = "max_pose"
        else:
            mode = "soft"
        (num, den, counts, nsum, ncnt), per = (pass_fn or self.pass_over)(idx, plan, mode, it)
        changed = self.record(idx, per, it)
        reseeded = 0
        if n_full > 0 or online:
            if online:
                # Step size of the running sums: (t+1)^-0.5 forgets stale batches
                # faster than ^-0.7 (purity 0.65/0.87 -> 0.90/0.90 on two 48 px test sets;
                # ^-0.9 was worse, 0.58/0.76).
                eta = 1.0 if it == 0 else (it + 1) ** -0.5
                lam = 1.0 - eta
                s.num = lam * s.num + num
                s.den = lam * s.den + den
                s.counts = lam * s.counts + counts
                s.noise_sum = lam * s.noise_sum + nsum
                s.noise_cnt = lam * s.noise_cnt + ncnt
            else:
                s.num, s.den, s.counts, s.noise_sum, s.noise_cnt = num, den, counts, nsum, ncnt
            sig = (s.noise_sum / s.noise_cnt.clamp(min=1)).float()
            s.sigma2_shell = self._noise_model(torch.where(s.noise_cnt > 0, sig, s.sigma2_shell))
            if online and it < n_online - 1:
                merge = it >= _MERGE_FROM * n_online
                null_ok = cfg.empty_class and it >= _NULL_FROM[cfg.start] * n_online
                reseeded = self._reseed_empty(idx, per, plan, merge=merge, null_ok=null_ok)
            self._update_classes(allow_recenter=not last)
        n_dense = self._dense_references(plan)
        record = {
            "iteration": it + 1,
            "phase": "online" if online else "full",
            "particles": int(len(idx)),
            "particles_seen": int(np.sum(s.class_index >= 0)),
            "resolution_angst": round(self.geom.radius_to_angst(s.r_res), 2),
            "align_radius": round(plan.r_cur, 2),
            "psi_step_deg": round(360.0 / len(plan.psi_rad), 3),
            "n_shifts": int(len(plan.shifts_px)),
            "temperature": round(plan.temperature, 3),
            "class_changes": round(changed, 4),
            "reseeded": reseeded,
            "sampled_reference_classes": 0 if n_dense is None else self.K - n_dense,
            "time_s": round(time.perf_counter() - t0, 3),
        }
        if self.device.type == "cuda":  # peak GPU memory so far
            record["device_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        s.history.append(record)
        return record

    def record(self, idx: np.ndarray, per: dict, iteration: int) -> float:
        """Store per-particle results; return the fraction whose class changed."""
        s = self.state
        prev = s.class_index[idx]
        seen = prev >= 0
        changed = float(np.mean(prev[seen] != per["k"][seen])) if seen.any() else 1.0
        s.class_index[idx] = per["k"]
        s.psi_rad[idx] = per["psi"]
        s.shift_work[idx] = per["shift"]
        s.max_prob[idx] = per["max_prob"]
        s.class_post[idx] = per["post"]
        s.class_ess[idx] = per["ess"]
        if self.config.estimate_scale and iteration >= 1:
            fitted = per["norm"] > 0
            est = np.where(fitted, per["cross"] / np.maximum(per["norm"], 1e-12), 1.0)
            # A scale and its class's amplitude trade off freely in the
            # likelihood, and the classes' Wiener shrinkage and the best pose's
            # noise both bias each estimate up: left alone, the scales drift
            # up over the iterations (1 -> 2.2 in 40 on the 48 px test set) and
            # sharpen every posterior with them. As RELION does with its scale
            # corrections, the batch's are normalised, here to a median of 1.
            middle = float(np.median(est[fitted])) if fitted.any() else 1.0
            if middle > 0:
                est = np.where(fitted, est / middle, 1.0)
            s.scale[idx] = np.clip(est, 0.2, 5.0)
        return changed


def run_em(
    particles: ParticleSet,
    config: EMConfig,
    *,
    device: str = "cpu",
    on_iteration: Callable[[dict], None] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    make_pass: Callable[[Engine], Callable] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> EMResult:
    """Classify ``particles`` into ``config.n_classes`` 2D classes.

    Parameters
    ----------
    particles : ParticleSet
    config : EMConfig
    device : str
        "cpu" or "cuda".
    on_iteration : callable, optional
        Called with each iteration's log record (dict).
    checkpoint : Path, optional
        File to save the state to after every iteration (atomically).
    resume : bool
        Continue from ``checkpoint`` if it exists; ``on_iteration`` is first
        called again with the records of the iterations already done.
    make_pass : callable, optional
        Called once with the :class:`Engine`; returns the ``pass_fn`` that
        every :meth:`Engine.iterate` uses instead of :meth:`Engine.pass_over`
        (e.g. :class:`cryo2d.em.distributed.DaskPass`).
    on_note : callable, optional
        Called with a line for the user after each stage of the split start
        (:func:`cryo2d.em.start.split_start`).

    Returns
    -------
    EMResult
    """
    check_device(device)
    eng = Engine(particles, config, device)
    s, cfg = eng.state, config
    start_iter = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start_iter = st.load_checkpoint(eng, checkpoint)
        if on_iteration is not None:  # replay the log of the finished iterations
            for record in s.history:
                on_iteration(record)
    else:
        start_classes(eng, on_note)
    n_online, n_full = cfg.n_online_iterations, cfg.n_full_iterations
    total = n_online + max(n_full, 1)
    pass_fn = make_pass(eng) if make_pass is not None else None
    for it in range(start_iter, total):
        record = eng.iterate(it, pass_fn=pass_fn)
        if checkpoint is not None:
            st.save_checkpoint(eng, checkpoint, it + 1)
        if on_iteration is not None:
            on_iteration(record)
    return final_result(eng, on_iteration)


def final_result(eng: Engine, on_iteration: Callable[[dict], None] | None = None) -> EMResult:
    """:func:`eng_result` with the classes of :meth:`Engine.average_pass` where it runs.

    The pass's log record (phase "average": particles, resolution, time)
    goes to ``on_iteration`` and ends the result's history; the engine's own
    history (the checkpoint's) holds the iterations only.
    """
    t0 = time.perf_counter()
    fine = eng.average_pass()
    result = eng_result(eng, fine)
    if fine is not None:
        record = {
            "iteration": len(eng.state.history) + 1,
            "phase": "average",
            "particles": int(np.sum(eng.state.class_index >= 0)),
            "resolution_angst": round(fine.geom.radius_to_angst(fine.state.r_res), 2),
            "time_s": round(time.perf_counter() - t0, 3),
        }
        result.history.append(record)
        if on_iteration is not None:
            on_iteration(record)
    return result


def eng_result(eng: Engine, fine: Engine | None = None) -> EMResult:
    """Collect the final classes and per-particle results (input-box units).

    ``fine`` (:meth:`Engine.average_pass`), when given, supplies the class
    averages and their resolutions; the particles' results are ``eng``'s.
    """
    s, g = eng.state, eng.geom
    prior = eng.particles.prior_shift_px  # the search's shifts are from the input's (load_batch)
    B, D = g.work_box, g.box
    src = eng if fine is None else fine  # the classes written
    cs, cg = src.state, src.geom
    A = cs.A
    if cs.null_class >= 0:  # its reference is zero: show the (Wiener) average of its members
        A = A.clone()
        A[cs.null_class] = src._wiener(cs.num[cs.null_class : cs.null_class + 1], cs.den[cs.null_class : cs.null_class + 1])[1][0]
    images = ifft2c(pad_fourier(src._grid(A), D), real=True)
    # The M-step constraints hold on the band-limited classes only up to ringing;
    # the written classes obey them exactly. Flat solvent: the noise an average
    # carries outside its particle is not shown (median NCC to the true view,
    # benchmarks/README.md, Session 8).
    circle = soft_mask(D, cg.mask_inner_px * D / cg.work_box, cg.mask_outer_px * D / cg.work_box, device=images.device)
    if eng.config.clamp_solvent:
        images = images * circle
    if eng.config.non_negative:
        images = images.clamp(min=0)
    unmasked = None
    if eng.config.flatten_solvent:
        unmasked = images.cpu().numpy().astype(np.float32)
        images = images * (src._support_masks(images, circle) if eng.config.auto_mask else circle)
    classes = images.cpu().numpy().astype(np.float32)
    counts = np.bincount(s.class_index[s.class_index >= 0], minlength=eng.K).astype(np.float64)
    last = int(src.mpts.shell.max())  # the last shell of the averages' band
    res = np.array([cg.radius_to_angst(float(r)) for r in class_resolution_shell(src.class_ssnr(), last).cpu()])
    return EMResult(
        classes=classes,
        counts=counts,
        resolution_angst=res,
        class_index=s.class_index.copy(),
        psi_deg=np.degrees(s.psi_rad).astype(np.float64) % 360.0,
        shift_px=s.shift_work.astype(np.float64) * (D / B) + (0.0 if prior is None else prior),
        max_prob=s.max_prob.astype(np.float64),
        class_posterior=s.class_post.astype(np.float64),
        class_ess=s.class_ess.astype(np.float64),
        scale=s.scale.astype(np.float64),
        history=list(s.history),
        geometry=g,
        empty_class=max(s.null_class, -1),
        classes_unmasked=unmasked,
    )
