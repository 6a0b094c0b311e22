"""Where the time of one online-EM pass goes (cProfile, cumulative time).

By default simulates the small preset (1,500 particles, 48 px) into a
temporary folder, initialises the engine (K = 12), sets the class resolution
to 20 Fourier px (E-step radius 23) and profiles one pass over a batch of
1,200 particles. ``--star`` profiles a particle set of your own instead.

    python benchmarks/profile_pass.py [--exhaustive]
    python benchmarks/profile_pass.py --star benchmarks/_cache/sim/peer-n3000-b64-snr0.05-j0.1-v20-s0/particles.star \
        --classes 20 --batch 2000 --r-res 12
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np

from cryo2d.em.config import EMConfig
from cryo2d.em.engine import Engine
from cryo2d.io import read_particles
from cryo2d.simulate import bundled_map_path, read_map, simulate, write_simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exhaustive", action="store_true", help="profile the exhaustive E-step")
    ap.add_argument("--star", type=Path, help="particles to profile on (default: simulate the small preset)")
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1200, help="particles in the pass")
    ap.add_argument("--r-res", type=float, default=20.0, help="class resolution, Fourier px (E-step radius = this + 3)")
    ap.add_argument("--mode", default="soft", choices=["soft", "hard"], help="soft (K <= 20 default) or hard assignment")
    ap.add_argument("--lines", type=int, default=12, help="profile lines to print")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        star = args.star
        if star is None:
            sim = simulate(*read_map(bundled_map_path()), n_particles=1500, box=48, snr=0.1, seed=0)
            write_simulation(sim, Path(tmp))
            star = Path(tmp) / "particles.star"
        particles = read_particles(star)
        eng = Engine(particles, EMConfig(n_classes=args.classes, seed=0, coarse_to_fine=not args.exhaustive))
        eng.initialise()
        eng.state.r_res = eng.state.r_res_sums = args.r_res
        plan = eng.plan(10, online=True)
        n = min(args.batch, len(particles))
        idx = np.sort(eng.rng.choice(len(particles), n, replace=False))
        eng.pass_over(idx[: min(n, 256)], plan, args.mode, 10)  # warm-up: first-call costs, heap
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.enable()
        eng.pass_over(idx, plan, args.mode, 10)
        profile.disable()
        print(f"one pass, {n} particles, K = {args.classes}, E-step radius {plan.r_cur:g}, "
              f"{len(plan.psi_rad)} rotations, {len(plan.shifts_px)} shifts: {time.perf_counter() - t:.2f} s")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.lines)


if __name__ == "__main__":
    main()
