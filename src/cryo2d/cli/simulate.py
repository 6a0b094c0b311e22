"""Simulate particle images with CTF, noise, junk and ground truth from a 3D map.

Projects MAP (an MRC file, or the word `bundled` for the bundled EMD-1832
map) into DIR/particles.mrcs + DIR/particles.star (RELION 3.1), with the
ground truth in DIR/truth.csv, DIR/truth.json and the clean view
projections in DIR/views.mrcs. A map that is not a cube is zero-padded to
one about its centre.

examples:
  $ cryo2d simulate bundled -o sim
  $ cryo2d simulate bundled -o sim48 -n 1500 --box 48 --snr 0.05
  $ cryo2d simulate emd_3488.mrc -o hb --box 64 --pixel-size 2.0 --views uniform --seed 3
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from cryo2d.cli.classify import out_arg, seed_arg
from cryo2d.errors import Cryo2DError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", metavar="MAP", help="3D map (.mrc/.map, may be .gz) or 'bundled'")
    parser.add_argument("-o", "--out", type=out_arg, required=True, metavar="DIR", help="output folder")
    parser.add_argument("-n", "--n-particles", type=int, default=1000, metavar="N", help="images, junk included (default 1000)")
    parser.add_argument("--box", type=int, default=64, metavar="PX", help="image size in px (default 64)")
    parser.add_argument(
        "--pixel-size", type=float, default=None, metavar="Å",
        help="pixel size in Å (default: the map's box fills the image)",
    )
    parser.add_argument("--map-pixel-size", type=float, default=None, metavar="Å", help="voxel size of MAP when its header lacks one")
    parser.add_argument("--snr", type=float, default=0.1, metavar="S", help="signal/noise variance ratio (default 0.1)")
    parser.add_argument("--junk-fraction", type=float, default=0.1, metavar="F", help="fraction of junk images (default 0.1)")
    parser.add_argument("--views", choices=["discrete", "uniform", "preferred"], default="discrete", help="view distribution (default discrete)")
    parser.add_argument("--n-views", type=int, default=8, metavar="V", help="discrete views / uniform bins (default 8)")
    parser.add_argument("--rare-fraction", type=float, default=0.03, metavar="F", help="fraction of particles in the rare view, below 1 (at most 0.5 with --views preferred); 0: no rare view (default 0.03)")
    parser.add_argument("--seed", type=seed_arg, default=0, metavar="S", help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from cryo2d.simulate import MapContentError, dark_map_note, read_map, simulate, write_simulation

    start = time.perf_counter()
    volume, voxel = read_map(args.map)
    if args.map_pixel_size is not None:
        if not 0 < args.map_pixel_size < math.inf:
            raise Cryo2DError(f"--map-pixel-size must be positive and finite, got {args.map_pixel_size}")
        voxel = args.map_pixel_size
    if not voxel or voxel <= 0:
        raise Cryo2DError(f"{args.map}: map header has no voxel size (give --map-pixel-size)")
    for name, value in (("-n", args.n_particles), ("--box", args.box), ("--n-views", args.n_views)):
        if value < 1:
            raise Cryo2DError(f"{name} must be positive, got {value}")
    if args.box < 8:
        raise Cryo2DError(f"--box must be at least 8 px, got {args.box}")
    if not 0 < args.snr < math.inf:  # inf: noise and ice images would be blank, yet labelled junk
        raise Cryo2DError(f"--snr must be positive and finite, got {args.snr}")
    if (note := dark_map_note(volume)) is not None:
        print(f"{args.map}: {note}", file=sys.stderr)
    try:
        sim = simulate(
            volume,
            voxel,
            n_particles=args.n_particles,
            box=args.box,
            pixel_size_angst=args.pixel_size,
            snr=args.snr,
            junk_fraction=args.junk_fraction,
            views=args.views,
            n_views=args.n_views,
            rare_view_fraction=args.rare_fraction,
            seed=args.seed,
        )
    except MapContentError as err:  # a problem of the map's content: name its file
        raise Cryo2DError(f"{args.map}: {err.problem}") from None
    out = write_simulation(sim, args.out)
    counts = sim.truth["kind"].value_counts().to_dict()
    print(
        f"wrote {len(sim.images)} images of {args.box} px at {sim.pixel_size_angst:.3f} Å to {out} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; {'no rare view' if sim.rare_view is None else f'rare view {sim.rare_view}'}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
