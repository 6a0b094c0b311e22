"""Where the time of one online-EM pass goes (cProfile, cumulative time).

Simulates the small preset (1,500 particles, 48 px) into a temporary folder,
initialises the engine (K = 12), sets the E-step radius to the full 23
Fourier pixels and profiles one pass over a batch of 1,200 particles.

    python benchmarks/profile_pass.py [--exhaustive]
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate(*read_map(bundled_map_path()), n_particles=1500, box=48, snr=0.1, seed=0)
        write_simulation(sim, Path(tmp))
        particles = read_particles(Path(tmp) / "particles.star")
        eng = Engine(particles, EMConfig(n_classes=12, seed=0, coarse_to_fine=not args.exhaustive))
        eng.initialise()
        eng.state.r_res = 20.0
        plan = eng.plan(10, online=True)
        idx = np.sort(eng.rng.choice(len(particles), 1200, replace=False))
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.enable()
        eng.pass_over(idx, plan, "soft", 10)
        profile.disable()
        print(f"one pass, 1200 particles, E-step radius {plan.r_cur:g}: {time.perf_counter() - t:.2f} s")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(12)


if __name__ == "__main__":
    main()
