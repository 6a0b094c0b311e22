"""The starting classes of a run: classes grown by binary splitting (the default), or random subsets.

Random subsets averaged at random angles (:meth:`Engine.initialise`, RELION's
and CryoSPARC's start) are all close to one rotational blur of the data: the
classes the first iterations break out of them are mixtures of views, and
where views look alike the run keeps them (views uniform over the sphere,
SNR 0.05: started from the true classes, the same job ends at purity 0.27
and median NCC 0.95, from random subsets at 0.13 and 0.87; benchmarks/README.md,
session 38). The split start grows the classes instead, as the Linde-Buzo-Gray
algorithm grows a codebook: 1 class, then 2, 4, 8, ... up to the largest
power of two below K, each stage a short run of its own (``STAGE_ITERATIONS``
online iterations of the engine's schedule at its own class count, no
empty-box class), then K. After a stage's iterations a hard pass over a
random sample gives each sampled particle a class, pose and fit z; the next
stage starts from those particles at those poses, its classes split, so the
classes stay aligned with each other while they part. A split takes the
largest class's worse-fitting half (lower fit z, as the class moves use it);
the last split, to K, first gives each class's misfits (the class moves'
misfit groups) a class of their own, where a rarer view hidden in a class
can grow.

Session 38 measured it over 21 runs of eight sets (purity 0.49 → 0.71 and
median NCC 0.938 → 0.969 on haemoglobin at 48 px, 0.126 → 0.155 and 0.882 →
0.904 with views uniform over the sphere) but found rare views kept less
often, and left it an option. Session 56 measured it again on the engine of
then, with two iterations a stage instead of three: over 30 runs (ten sets
of 1,000-5,000 particles, 48-96 px, discrete and spread views, 10-50 % junk,
EM seeds 0-2) purity +0.025 (higher in 23 runs, lower in 7), median NCC
+0.010 (16 / 7), junk F1 level (−0.001), the rare view kept in 17 runs, as
many as from the random start; on 20,000 particles at K = 20 and 50 (4 runs) ahead on
purity and median NCC in all 4 and on junk F1 in 3 (level in the fourth), the
rare view kept in 4 runs against 2. It costs about 15 % more CPU time (the
stages do not grow with the number of particles; on 20,000 particles at
K = 50, 13 %). It is the default; ``--start random`` is the faster choice
(benchmarks/README.md, session 56). On the engine issue's 48 px test set it
kept the rare view in only 4 of 10 EM seeds (the random start: 8) until
session 57 let the main run's empty-box class come earlier with this start
(``engine._NULL_FROM``): the stages have none, so the empty boxes and the
rare view had shared a class; now 8 of 10.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from cryo2d.em.engine import Engine

#: Online iterations of each splitting stage.
STAGE_ITERATIONS = 2


def stage_sizes(n_classes: int) -> list[int]:
    """Class counts of the splitting stages before ``n_classes``: 1, 2, 4, ... below it ([] for K = 1)."""
    sizes, k = [], 1
    while k < n_classes:
        sizes.append(k)
        k *= 2
    return sizes


def split_labels(labels: np.ndarray, fit_z: np.ndarray, n_groups: int, seeds: list[np.ndarray] = ()) -> np.ndarray:
    """Split groups of ``labels`` until there are ``n_groups``; return labels 0 .. n_groups-1.

    Parameters
    ----------
    labels : (m,) int array
        Each particle's class in the stage before (any non-negative ids).
    fit_z : (m,) float array
        Each particle's fit z at its best pose (larger = fits its class better).
    n_groups : int
        Groups wanted (at most m).
    seeds : list of int arrays
        Rows that each become a group of their own first, in order, while
        groups are wanted (the last split: each class's misfits).

    Returns
    -------
    (m,) int64 array
        The groups, numbered by first appearance of their old class, then
        the seeds; after them the largest group is split (ties: the lower
        number), its worse-fitting half (the lower ``fit_z``, ties by index)
        taking the next number. A group of one particle is never split.
    """
    labels = np.asarray(labels)
    m = len(labels)
    if n_groups > m:
        raise ValueError(f"cannot make {n_groups} groups of {m} particles")
    _, new = np.unique(labels, return_inverse=True)
    new = new.astype(np.int64)
    n = int(new.max()) + 1 if m else 0
    for rows in seeds:
        if n >= n_groups:
            break
        new[rows] = n
        n += 1
    while n < n_groups:
        sizes = np.bincount(new, minlength=n)
        big = int(np.argmax(sizes))  # first of the largest
        members = np.nonzero(new == big)[0]
        worse = members[np.argsort(fit_z[members], kind="stable")[: len(members) // 2]]
        new[worse] = n
        n += 1
    return new


def split_start(engine: Engine, on_stage: Callable[[str], None] | None = None) -> None:
    """Set ``engine``'s starting classes by binary splitting (see the module docstring).

    Each stage is an :class:`~cryo2d.em.engine.Engine` of its own on the same
    particles and image cache, seeded from ``engine``'s random generator. After
    its online iterations one hard pass over a random sample (the size of the
    random start's, :meth:`Engine.start_sample_size`) gives
    each sampled particle a class, pose and fit; the next stage (or
    ``engine``) starts from those, its classes split (:func:`split_labels`),
    with the last stage's noise model. With K = 1 this is the random start.
    ``on_stage`` is called with a line for the user after each stage (its
    class counts and time), the start's progress before the first iteration.
    """
    from cryo2d.em.engine import Engine  # the engine module imports this one

    cfg, K, n = engine.config, engine.K, len(engine.particles)
    sizes = stage_sizes(K)
    if not sizes:
        engine.initialise()
        return
    m = engine.start_sample_size()
    start = None  # (particles, labels, angles, shifts, noise) for the next stage
    for i, k in enumerate(sizes):
        t0 = time.perf_counter()
        sub_cfg = dataclasses.replace(cfg, n_classes=k, n_online_iterations=STAGE_ITERATIONS, n_full_iterations=0,
                                      empty_class=False, seed=int(engine.rng.integers(2**31)))
        sub = Engine(engine.particles, sub_cfg, str(engine.device))
        sub.images = engine.images  # one cache of the particles for every stage
        if start is None:
            sub.initialise()
        else:
            sub.start_from(*start)
        for it in range(STAGE_ITERATIONS):
            sub.iterate(it)
        plan = sub.plan(STAGE_ITERATIONS - 1, True)
        idx = np.sort(sub.rng.choice(n, size=m, replace=False))
        _, per = sub.pass_over(idx, plan, "hard" if sub_cfg.force_max_effective else "hard_class", STAGE_ITERATIONS)
        target = sizes[i + 1] if i + 1 < len(sizes) else K
        z = sub._fit_z(per)
        seeds = sub._misfit_groups(per["k"], z, exclude=set()) if target == K else []
        labels = split_labels(per["k"], z, target, seeds)
        start = (idx, torch.from_numpy(labels).to(engine.device), torch.from_numpy(per["psi"]).float().to(engine.device),
                 torch.from_numpy(per["shift"]).to(engine.device), sub.state.sigma2_shell, plan.psi_rad)
        if on_stage is not None:
            on_stage(f"split start, stage {i + 1} of {len(sizes)}: {k} class{'es' if k > 1 else ''}, "
                     f"split into {target} in {time.perf_counter() - t0:.1f}s")
    engine.start_from(*start)


def start_classes(engine: Engine, on_stage: Callable[[str], None] | None = None) -> None:
    """Set ``engine``'s starting classes as ``engine.config.start`` says (``on_stage``: :func:`split_start`)."""
    if engine.config.start == "split":
        split_start(engine, on_stage)
    else:
        engine.initialise()
