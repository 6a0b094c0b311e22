"""Class moves of the online phase: re-seeding empty classes, freeing redundant ones, growing new ones.

:class:`ClassMoves` holds the :class:`~cryo2d.em.engine.Engine` methods that
give classes a new start between online iterations (``Engine.iterate`` calls
``_reseed_empty``): which classes are empty, redundant (two classes of one
view) or junk-like, where their seeds come from (misfit groups of a class, or
classes grown from the batch's pooled misfits by E/M rounds of their own), and
whether a seed is distinct from every other class. They use the engine's state,
geometry and passes (``pass_over``, ``_read_fixed``, ``_wiener``); the
engine's other steps do not depend on them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from cryo2d.em.refine import pose_gain
from cryo2d.em.rotation import rotate_classes

if TYPE_CHECKING:
    from cryo2d.em.engine import IterationPlan

_INIT_READ = 256  # images read at a time at the full box (starting and re-seeded classes)
_REFINE_CHUNK = 128  # particles refined at a time (Engine.refine_final_poses): 128 copies of an oversampled class

# Class moves of the online phase (Engine._reseed_empty), measured in session
# 3 (that engine's search) on the simulated 48 px sets of the quality test
# (K = 12, 1,500 particles, one thread; today's figures are in
# test_quality_small). Seeds 0-2, junk F1 / purity / rare view kept: merges and misfit
# seeds only 0.77/0.75/0.79, 0.89/0.91/0.88, 0 of 3 (72 CPU s); with only
# distinct seeds (_SEED_RATIO) and classes grown from the pooled misfits
# (_GROW_ROUNDS = 2) 0.69/0.80/0.82, 0.87/0.93/0.87, 1 of 3 (84 CPU s).
# EM trajectories are chaotic: single seeds move by ±0.05 with any change.
_MERGE_RATIO = 3.0  # Δ / expected estimation noise below which two classes are one view
_MISFIT_SD = 2.0  # misfits: fit z below the class median by this many robust SDs
_MIN_SEED = 6  # smallest misfit group that seeds a class
_SEED_RATIO = 3.0  # a seed must be at least this far (Δ / E) from every other class
_POOL_SD = 1.5  # pooled misfits for growing classes: fit z this many robust SDs below the class median
_GROW_ROUNDS = 2  # E/M rounds over the pool that grow new classes
# After consecutive growing attempts that place nothing, the next ones wait:
# one iteration after the second failure, then _GROW_BACKOFF (every third
# iteration tries); a class placed resets the count (Engine._reseed_empty).
# Most placements come in the first iterations; on the ribosome 80 px set
# (K = 24) no attempt placed a class after the first, for 12 % of the job.
# Measured in session 28 (benchmarks/README.md): the same scores within the
# seeds' spread (`peer` seeds 0-23, rare view kept 13 against 11 of 24, median NCC
# 0.893 both), the ribosome job 4-5 % faster.
_GROW_BACKOFF = 2
_CLASS_FIELDS = ("num", "den", "counts", "A", "tau2")  # per-class state a class move replaces


class ClassMoves:
    """Re-seeding, merging and growing classes (mixed into :class:`~cryo2d.em.engine.Engine`)."""

    def _redundancy_ratio(self, plan: IterationPlan, cols: list[int] | None = None) -> Tensor | None:
        """(K, len(cols)) ratios Δ_ij / E_ij of class i to class j (see :meth:`_redundant_classes`).

        ``cols`` (default: every class) are the classes rotated over the
        in-plane grid; the ratio is symmetric, so one column per class of
        interest suffices. Pairs involving an empty class and the diagonal
        are ``inf``. None when no frequency lies in the alignment band.
        """
        s, g = self.state, self.geom
        m = self.mpts
        cols = list(range(self.K)) if cols is None else list(cols)
        r = m.xy.norm(dim=1)
        sel = (r <= plan.r_cur) & (r >= g.r_min_align)
        counts = s.counts.float()
        if int(sel.sum()) == 0 or float(counts.sum()) <= 0:
            return None
        sig = s.sigma2_shell[m.shell[sel]]
        den = s.den[:, sel].float()
        c = m.weight[sel] * (den.sum(dim=0) / counts.sum()) / sig
        v = den * sig / (den + sig / s.tau2[:, m.shell[sel]]).square()
        e_noise = (c * v).sum(dim=1)
        xy, psi, K, R = m.xy[sel], plan.psi_rad, self.K, len(plan.psi_rad)
        grids, A0 = self._masked_views(psi[:1])
        A0 = A0[:, sel]  # (K, p)
        n_pts = A0.shape[1]
        power = (c * A0.abs().square()).sum(dim=1)
        Yr = torch.view_as_real((A0 * c).contiguous()).reshape(K, 2 * n_pts)
        cross = torch.empty((K, len(cols)), device=self.device)
        step = max(1, int(64e6 // (8 * R * n_pts)))  # rotated classes in chunks of ≤ 64 MB
        for j in range(0, len(cols), step):
            rot = rotate_classes(grids[cols[j : j + step]], xy, psi, self.config.zeropad)  # (J, R, p)
            Zr = torch.view_as_real(rot.reshape(-1, n_pts).contiguous()).reshape(-1, 2 * n_pts)
            cross[:, j : j + step] = (Yr @ Zr.T).view(K, -1, R).amax(dim=2)
        colt = torch.tensor(cols, dtype=torch.long, device=self.device)
        delta = power[:, None] + power[colt][None, :] - 2.0 * cross
        ratio = delta / (e_noise[:, None] + e_noise[colt][None, :]).clamp(min=1e-12)
        ratio[colt, torch.arange(len(cols), device=self.device)] = float("inf")
        ratio[counts <= 0.5] = float("inf")
        ratio[:, counts[colt] <= 0.5] = float("inf")
        return ratio

    def _masked_views(self, psi0: Tensor) -> tuple[Tensor, Tensor]:
        """The classes within the circular mask: (K, B, B) centred grids, and (K, m) their transforms
        rotated by ``psi0`` (a 1-element tensor) at the M-step points, for :meth:`_redundancy_ratio`.

        A class move changes a class or two between calls (a seed tried, a class restored), so
        only the classes whose average changed since the last call are made again.
        """
        s, old = self.state, self._views
        if old is None or old[0] != float(psi0) or old[1].shape != s.A.shape:
            todo = torch.arange(self.K, device=self.device)
            B = self.geom.work_box
            old = (float(psi0), s.A.clone(), torch.empty((self.K, B, B), dtype=torch.complex64, device=self.device),
                   torch.empty_like(s.A))
        else:
            todo = torch.nonzero((old[1] != s.A).any(dim=1)).flatten()
        if len(todo):
            grids = self._grid(self._to_points(self._to_real(s.A[todo]) * self.mask))
            old[1][todo] = s.A[todo]
            old[2][todo] = grids
            old[3][todo] = rotate_classes(grids, self.mpts.xy, psi0, self.config.zeropad)[:, 0]
        self._views = old
        return old[2], old[3]

    def _redundant_classes(self, plan: IterationPlan) -> list[int]:
        """Classes that a particle cannot tell apart from another class: the smaller of each such pair.

        For classes i, j the distance Δ_ij = min_ψ Σ_f c_f |A_i(f) − A_j(R_ψ f)|²,
        c_f = w_f ⟨CTF²⟩_f / σ²_f over the alignment frequencies, is twice the
        log-likelihood gap a typical particle sees between them. Two estimates
        of the same view differ only by their estimation noise, whose expected
        contribution is E_ij = Σ_f c_f (v_i + v_j) with the Wiener variance
        v = den σ² / (den + σ²/τ²)². A pair with Δ_ij < ``_MERGE_RATIO`` · E_ij
        is one view split over two classes (measured on a 48 px set: 2.1 for
        such a pair, ≥ 5.6 for every pair of distinct views or junk classes).
        """
        ratio = self._redundancy_ratio(plan)
        if ratio is None:
            return []
        ratio = 0.5 * (ratio + ratio.T)
        if self.state.null_class >= 0:  # the empty-box class is nobody's duplicate
            ratio[self.state.null_class] = ratio[:, self.state.null_class] = float("inf")
        counts, K = self.state.counts, self.K
        freed, used = [], set()
        for flat in torch.argsort(ratio.flatten()).tolist():
            i, j = divmod(flat, K)
            if float(ratio[i, j]) >= _MERGE_RATIO:
                break
            if i in used or j in used:
                continue
            used.update((i, j))
            freed.append(j if float(counts[j]) <= float(counts[i]) else i)
        return freed

    def _reseed_empty(
        self, idx: np.ndarray, per: dict, plan: IterationPlan | None = None, merge: bool = False, null_ok: bool = False
    ) -> int:
        """Re-seed (nearly) empty classes, and free and re-seed redundant ones.

        A class holding under 10 % of the average occupancy counts as empty,
        in running (posterior-weighted) counts or as the best class of the
        batch's particles: a class that is many particles' second choice
        holds posterior mass but no particle once the last pass assigns each
        to its best class (hard sets, 64 px, K = 20: 2 classes ended empty;
        none since, and junk F1 0.611 -> 0.649, NCC 0.844 -> 0.869 on seed 0).
        With ``merge`` (needs ``plan``), of two classes holding the same view
        (:meth:`_redundant_classes`) the smaller, and every junk-like class
        but the largest (:meth:`_junk_like`), are candidates to free: they
        are re-seeded when a distinct seed is found, and kept otherwise.

        Seeds, in order of preference:

        1. classes grown from the batch's pooled misfits
           (:meth:`_grow_seeds`): particles that fit their class badly (fit
           z = (C − N)/√N, the best pose's log-likelihood gain over its
           expectation for a true member, in noise standard deviations, far
           below the class median), among them the rarer views and
           overlapping particles that no class models;
        2. the misfits of one class (more than ``_MISFIT_SD`` robust SDs
           below its median, at least ``_MIN_SEED``), averaged at their best
           poses, largest group first.

        Either must be distinct from every other class (``_SEED_RATIO``,
        :meth:`_place_seed`): the worst members of a class are mostly the tail
        of its own view, and seeding from them would duplicate it. An empty
        class with no seed left gets the worst-fitting half of the largest
        class's members (or, with too few, a perturbed copy of the largest
        class).

        After consecutive growing attempts that placed nothing, the next
        ones wait (one iteration after the second failure, then
        ``_GROW_BACKOFF``); the targets of an iteration that waits go
        straight to 2.

        Returns the number of classes given a new start (the log's
        ``reseeded``): a freed class that found no distinct seed keeps what it
        held and is not counted.
        """
        s = self.state
        expected = float(s.counts.sum()) / self.K
        wins = np.bincount(per["k"], minlength=self.K)  # best class of the batch's particles
        empty = (s.counts < max(1.0, 0.1 * expected)).cpu().numpy() | (wins < max(1.0, 0.1 * len(idx) / self.K))
        empty = np.nonzero(empty)[0].tolist()
        if s.null_class >= 0 and s.null_class in empty:  # no empty boxes to hold: an ordinary class from now on
            s.null_class = -2
        z = self._fit_z(per)
        seeds = self._misfit_groups(per["k"], z, exclude=set(empty) | {s.null_class})
        redundant = []
        if merge and plan is not None:
            # Duplicated views, then all but the largest junk-like class.
            redundant = [k for k in self._redundant_classes(plan) if k not in empty]
            redundant += [k for k in self._junk_like(per["k"], z)[1:] if k not in empty and k not in redundant]
        targets = empty + redundant
        placed = 0  # classes given a new start
        if null_ok and s.null_class == -1 and targets and plan is not None:
            # Particles no class explains better than noise: best-pose gain below log(T · R).
            gain = (per["cross"] - 0.5 * per["norm"]) / plan.temperature
            rows = np.nonzero(gain < math.log(len(plan.shifts_px) * len(plan.psi_rad)))[0]
            if len(rows) >= _MIN_SEED:
                s.null_class = targets.pop(0)
                self._seed_class(s.null_class, idx, per, rows, plan)
                placed += 1
        grown: set = set()
        if plan is not None and targets:
            if s.grow_wait > 0:  # backing off after attempts that placed nothing
                s.grow_wait -= 1
            else:
                grown = self._grow_seeds(targets, idx, per, z, plan)
                s.grow_failures = 0 if grown else s.grow_failures + 1
                s.grow_wait = min(max(s.grow_failures - 1, 0), _GROW_BACKOFF)
        placed += len(grown)
        split = set()
        for k in targets:
            if k in grown:
                continue
            if seeds and self._place_seed(k, idx, per, seeds, plan):
                placed += 1
                continue
            if k in redundant:
                continue  # no distinct seed: the pair stays as it is
            placed += 1
            if seeds:
                rows = seeds.pop(0)
            else:
                order = torch.argsort(s.counts, descending=True).tolist()
                big = next((c for c in order if c not in split and c != k), order[0])
                split.add(big)
                members = np.nonzero(per["k"] == big)[0]
                if len(members) < 8:
                    self._copy_class(big, k)
                    continue
                rows = members[np.argsort(z[members], kind="stable")[: len(members) // 2]]
            self._seed_class(k, idx, per, np.sort(rows), plan)
        return placed

    def _grow_seeds(self, targets: list[int], idx: np.ndarray, per: dict, z: np.ndarray, plan: IterationPlan) -> set:
        """Grow new classes for ``targets`` from the batch's pooled misfits; return the targets placed.

        The pool is every member of a well-fitting class (median fit z ≥ 0)
        whose fit z lies more than ``_POOL_SD`` robust SDs below its class
        median: the tail of each view plus the particles no class models
        (rarer views, overlapping particles). The targets start from random
        parts of the pool at their best poses; then ``_GROW_ROUNDS`` E/M
        rounds over the pool alone update only the targets, while every other
        class stays fixed, so the tail particles go back to their own views
        and a target keeps what none of them models. A target is placed when
        it ends with at least ``_MIN_SEED`` particles and is distinct (ratio
        ≥ ``_SEED_RATIO``, :meth:`_redundancy_ratio`) from every other class
        and from the targets placed before it; the others get their sums back.
        """
        s = self.state
        groups = self._misfit_groups(per["k"], z, exclude=set(targets) | {s.null_class}, sd_cut=_POOL_SD, min_rows=1)
        pool = np.sort(np.concatenate(groups)) if groups else np.zeros(0, dtype=np.int64)
        if len(targets) == 0 or len(pool) < 2 * _MIN_SEED:
            return set()
        saved = {k: self._class_copy(k) for k in targets}
        parts = np.array_split(self.rng.permutation(pool), len(targets))
        seeded = [(k, np.sort(rows)) for k, rows in zip(targets, parts) if len(rows)]
        self._seed_classes([k for k, _ in seeded], idx, per, [rows for _, rows in seeded], plan)
        for k, _ in seeded:
            self._solve_one(k)
        mode = "hard" if self.config.force_max_effective else "soft"
        tk = torch.tensor(targets, dtype=torch.long, device=self.device)
        # Hard assignment: a pool particle's best class outside the targets is the one it has
        # (the other classes stay fixed), so only the targets are searched, against its own pose.
        rival = self._own_pose_logp(idx[pool], per, pool, plan) if mode == "hard" else None
        for _ in range(_GROW_ROUNDS):
            (num, den, counts, _, _), _ = self.pass_over(idx[pool], plan, mode, 0, classes=tk, rival=rival, noise=False)
            s.num[tk], s.den[tk], s.counts[tk] = num[tk], den[tk], counts[tk]
            for k in targets:
                self._solve_one(k)
        ratio = self._redundancy_ratio(plan, targets)  # column j: target j against every class
        placed: set = set()
        for j, k in sorted(enumerate(targets), key=lambda jk: -float(s.counts[jk[1]])):
            ok = float(s.counts[k]) >= _MIN_SEED
            if ok and ratio is not None:
                others = [c for c in range(self.K) if c != k and (c not in targets or c in placed)]
                ok = float(ratio[others, j].min()) >= _SEED_RATIO
            if ok:
                placed.add(k)
        for k in targets:
            if k not in placed:
                self._class_restore(k, saved[k])
        return placed

    def _own_pose_logp(self, ids: np.ndarray, per: dict, rows: np.ndarray, plan: IterationPlan) -> Tensor:
        """(n,) log-probability of particles ``ids`` (batch rows ``rows`` of ``per``) at their best pose of
        the pass, scored as the E-step of ``plan`` scores it with the current noise model and scales."""
        s, cfg, g, dev = self.state, self.config, self.geom, self.device
        points = plan.points
        labels = torch.from_numpy(per["k"][rows]).to(dev)
        classes, inv_sig, at_points = self._scoring_inputs(points)
        out = torch.empty(len(ids), device=dev)
        for start in range(0, len(ids), _REFINE_CHUNK):
            part = slice(start, start + _REFINE_CHUNK)
            X, ctf = (v[:, at_points] for v in self.images.read_with_ctf(ids[part]))
            out[part] = pose_gain(
                X, ctf, torch.from_numpy(s.scale[ids[part]]).float().to(dev), inv_sig, points.xy, g.work_box, classes,
                labels[part], torch.from_numpy(per["psi"][rows[part]]).float().to(dev),
                torch.from_numpy(per["shift"][rows[part]]).float().to(dev), cfg.zeropad,
            )
        return out / plan.temperature + s.log_prior[labels]

    def _class_copy(self, k: int) -> tuple:
        """Copies of class ``k``'s sums, count, average and signal prior (see :meth:`_class_restore`)."""
        s = self.state
        return tuple(getattr(s, name)[k].clone() for name in _CLASS_FIELDS)

    def _class_restore(self, k: int, saved: tuple) -> None:
        for name, value in zip(_CLASS_FIELDS, saved):
            getattr(self.state, name)[k] = value

    def _place_seed(self, k: int, idx: np.ndarray, per: dict, seeds: list[np.ndarray], plan: IterationPlan | None) -> bool:
        """Seed class ``k`` from the first group in ``seeds`` whose average is distinct from every other class.

        A group of a class's worst-fitting members is often just the tail of
        that class's own view; seeding from it duplicates the view. Each
        tried group is removed from ``seeds``; ``k`` keeps its sums when none
        is distinct (ratio ≥ ``_SEED_RATIO`` to every other class, see
        :meth:`_redundancy_ratio`).
        """
        saved = self._class_copy(k)
        while seeds:
            rows = seeds.pop(0)
            self._seed_class(k, idx, per, np.sort(rows), plan)
            if plan is None:
                return True
            self._solve_one(k)
            ratio = self._redundancy_ratio(plan, [k])
            if ratio is None or float(ratio.min()) >= _SEED_RATIO:
                return True
        self._class_restore(k, saved)
        return False

    @staticmethod
    def _fit_z(per: dict) -> np.ndarray:
        """Per particle, (C − N)/√N at its best pose: ~N(0, 1) for a particle the class models."""
        return (per["cross"] - per["norm"]) / np.sqrt(np.maximum(per["norm"], 1e-12))

    def _misfit_groups(
        self, labels: np.ndarray, z: np.ndarray, exclude: set, sd_cut: float = _MISFIT_SD, min_rows: int = _MIN_SEED
    ) -> list[np.ndarray]:
        """Batch rows of each class's misfits, largest group first (see :meth:`_reseed_empty`).

        ``labels`` and ``z`` are the batch's classes and fit z (:meth:`_fit_z`);
        a misfit lies more than ``sd_cut`` robust SDs below its class median,
        and only groups of at least ``min_rows`` count. Only classes with at
        least ``4 · _MIN_SEED`` members and a median fit z ≥ 0 count: a junk
        class (noise, ice) fits none of its members well and has no misfits
        to offer.
        """
        groups = []
        for c in range(self.K):
            if c in exclude:
                continue
            members = np.nonzero(labels == c)[0]
            if len(members) < 4 * _MIN_SEED:
                continue
            zc = z[members]
            med = float(np.median(zc))
            if med < 0:
                continue
            sd = 1.4826 * float(np.median(np.abs(zc - med)))
            rows = members[zc < med - sd_cut * max(sd, 1e-6)]
            if len(rows) >= min_rows:
                groups.append(rows)
        groups.sort(key=len, reverse=True)
        return groups

    def _junk_like(self, labels: np.ndarray, z: np.ndarray) -> list[int]:
        """Classes whose batch members fit them worse than true members would (median z < 0), largest first."""
        out = []
        for c in range(self.K):
            members = np.nonzero(labels == c)[0]
            if c != self.state.null_class and len(members) and float(np.median(z[members])) < 0:
                out.append((len(members), c))
        return [c for _, c in sorted(out, reverse=True)]

    def _seed_class(self, k: int, idx: np.ndarray, per: dict, rows: np.ndarray, plan: IterationPlan | None = None) -> None:
        """Class ``k`` := the average of batch rows ``rows`` aligned at their best poses (see :meth:`_seed_classes`)."""
        self._seed_classes([k], idx, per, [rows], plan)

    def _seed_classes(self, ks: list[int], idx: np.ndarray, per: dict, parts: list[np.ndarray],
                      plan: IterationPlan | None = None) -> None:
        """Each class ``ks[j]`` := the average of batch rows ``parts[j]`` aligned at their best poses.

        The particles come from the run's image cache at the M-step points,
        ``_INIT_READ`` at a time, one group of sums per read. Each class gets
        the sums :meth:`_seed_class` makes for it alone to float rounding (the
        de-shift phases and products of another batch round differently in
        their last bit). One call for a growing pass's targets saves a fixed
        cost per class (ribosome 80 px, K = 24: 11 ms a call). The batch's
        angles lie on the grid of its pass (``plan``), so the particles of
        one class and angle are summed before their back-rotation, and rows
        a quarter turn apart are back-rotated at once.
        """
        s = self.state
        rows = np.concatenate(parts)
        labels = torch.from_numpy(np.repeat(np.arange(len(ks)), [len(r) for r in parts])).to(self.device)
        psi = torch.from_numpy(per["psi"][rows]).float().to(self.device)
        shifts = torch.from_numpy(per["shift"][rows]).to(self.device)
        (num, den, _), _ = self._read_fixed(idx[rows], labels, psi, n_classes=len(ks), shifts_px=shifts, cached=True,
                                            group=_INIT_READ, grid=None if plan is None else plan.psi_rad)
        for j, k in enumerate(ks):
            s.num[k], s.den[k] = num[j], den[j]
            s.counts[k] = float(len(parts[j]))

    def _copy_class(self, big: int, k: int) -> None:
        """Class ``k`` := half of class ``big``'s sums plus a small perturbation (and ``big`` keeps half)."""
        s = self.state
        noise = torch.from_numpy(self.rng.standard_normal((len(self.mpts), 2)).astype(np.float32)).to(self.device)
        amp = (s.num[big].abs() * 0.1).unsqueeze(1)
        for name in ("num", "den", "counts"):
            arr = getattr(s, name)
            arr[big] = arr[big] * 0.5
            arr[k] = arr[big]
        s.num[k] = s.num[k] + torch.view_as_complex((noise * amp).contiguous())
