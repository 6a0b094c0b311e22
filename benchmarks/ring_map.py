"""Write a synthetic C7-symmetric ring map, for checking classification of a symmetric particle.

Two stacked rings of 7 Gaussian blobs (the lower ring wider, the upper one
turned by half a blob spacing) around a central rod: top views are 7-fold
symmetric, side views are not. EMDB maps with cyclic symmetry look like this
at low resolution (e.g. a heptameric pore); the map is made here because
``../shared/data`` holds no symmetric complex with more than 2-fold symmetry.

    $ python benchmarks/ring_map.py benchmarks/_cache/ring_c7.mrc
    $ python benchmarks/quality.py --small --map benchmarks/_cache/ring_c7.mrc --sim-args '--pixel-size 3' --same-mask
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mrcfile
import numpy as np

BOX = 64  # voxels
VOXEL_ANGST = 3.0


def ring_map(box: int = BOX, order: int = 7) -> np.ndarray:
    """(box, box, box) float32 density with ``order``-fold symmetry about z.

    Lower ring: radius 12 voxels at z = -6, blob sigma 2.5 voxels; upper ring:
    radius 8 at z = +6, sigma 2.2, turned by pi / order; central rod: sigma 2
    in x/y, from z = -10 to +10, half the blobs' peak density.
    """
    z, y, x = (np.mgrid[:box, :box, :box] - box // 2).astype(np.float64)
    rho = np.zeros((box, box, box))
    for radius, height, sigma, turn in ((12.0, -6.0, 2.5, 0.0), (8.0, 6.0, 2.2, np.pi / order)):
        for j in range(order):
            a = 2 * np.pi * j / order + turn
            d2 = (x - radius * np.cos(a)) ** 2 + (y - radius * np.sin(a)) ** 2 + (z - height) ** 2
            rho += np.exp(-0.5 * d2 / sigma**2)
    rod = np.exp(-0.5 * (x**2 + y**2) / 2.0**2) * (np.abs(z) <= 10)
    return (rho + 0.5 * rod).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output .mrc")
    p.add_argument("--order", type=int, default=7, help="symmetry order (default 7)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(ring_map(order=args.order))
        mrc.voxel_size = VOXEL_ANGST
    tmp.replace(args.out)
    print(f"wrote {args.out}: {BOX}^3 voxels of {VOXEL_ANGST} Å, C{args.order}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
