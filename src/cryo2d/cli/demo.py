"""Simulate particles from the bundled map (EMD-1832), classify them, write the gallery.

A self-contained tour: 1,500 particles of 48 px with CTF, noise at SNR 0.1,
8 views (one rare, 3 %) and 10 % junk (noise, ice, doublets) are written to
DIR/data, classified into 12 classes in DIR/job, and scored against the
simulation's ground truth.

Examples:

  $ cryo2d demo                 # writes ./cryo2d_demo
  $ cryo2d demo -o /tmp/demo -n 3000 --classes 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cryo2d.cli.classify import device_arg, out_arg, seed_arg


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", type=out_arg, default="cryo2d_demo", help="demo folder (default %(default)s)")
    p.add_argument("-n", type=int, default=1500, help="particles to simulate (default %(default)s)")
    p.add_argument("--box", type=int, default=48, help="box size, px (default %(default)s)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (default %(default)s)")
    p.add_argument("--classes", type=int, default=12, help="number of classes (default %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed (default %(default)s)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from cryo2d.classify import classify
    from cryo2d.cli.classify import print_note, progress_printer
    from cryo2d.em.config import EMConfig
    from cryo2d.em.geometry import MIN_BOX
    from cryo2d.errors import Cryo2DError
    from cryo2d.evaluate import score_job
    from cryo2d.simulate import bundled_map_path, read_map, simulate, write_simulation

    for flag, value, least in (("-n", args.n, 1), ("--box", args.box, MIN_BOX), ("--classes", args.classes, 1)):
        if value < least:  # before 1,500 particles are simulated and written
            raise Cryo2DError(f"{flag} must be at least {least}, got {value}")
    if args.classes > args.n:
        raise Cryo2DError(f"--classes {args.classes} is more than the {args.n} particles (-n)")
    if not 0 < args.snr < float("inf"):
        raise Cryo2DError(f"--snr must be positive and finite, got {args.snr}")
    out = Path(args.out)
    data, job = out / "data", out / "job"
    volume, voxel = read_map(bundled_map_path())
    sim = simulate(volume, voxel, n_particles=args.n, box=args.box, snr=args.snr, junk_fraction=0.1,
                   views="discrete", n_views=8, rare_view_fraction=0.03, seed=args.seed)
    write_simulation(sim, data)
    print(f"simulated {args.n} particles of {args.box} px at {sim.pixel_size_angst:.2f} Å/px into {data}", file=sys.stderr)
    config = EMConfig(n_classes=args.classes, seed=args.seed)
    with progress_printer(config.n_online_iterations + max(config.n_full_iterations, 1)) as on_iteration:
        classify(data / "particles.star", job, config, device=args.device, on_iteration=on_iteration,
                 on_note=lambda text: print_note(data / "particles.star", text))
    scores = score_job(job, data)
    keys = ("junk_f1", "purity", "rare_view_recovered", "median_ncc", "n_particle_classes", "n_junk_classes", "n_empty_classes")
    print(json.dumps({k: scores[k] for k in keys}, indent=1))
    print(f"class averages: {job / 'classes.mrcs'}; gallery: {job / 'gallery.png'}", file=sys.stderr)
    return 0
