"""Cap over-represented views: drop particles from superclasses of similar classes.

Groups the job's classes into superclasses of similar views (rotation- and
mirror-invariant correlation of the class averages, average-linkage
clustering), then drops particles at random from every superclass holding
more than --max-share of the particles kept; smaller superclasses keep all
their particles. Prints the distribution before and after. Writes
OUT/particles.star (kept) and OUT/dropped.star (.cs, each with its .csg,
for .cs input) and OUT/superclasses.star (class -> superclass, counts before/after). OUT may
be an earlier rebalance or select folder (the files of those outputs that
this run does not write go), not a classification job's folder.

examples:
  $ cryo2d select Class2D/run1 -o Select/good                  # the good classes
  $ cryo2d rebalance Select/good -o Rebalance/run1                # their views capped
  $ cryo2d rebalance Class2D/run1 -o Rebalance/p20 --max-share 0.2 --n-superclasses 8 --seed 3
"""
from __future__ import annotations

import argparse

from cryo2d.cli.classify import out_arg, seed_arg


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="classification job folder (classes.mrcs, classes.star, particles.star/.cs), or a cryo2d select output folder")
    parser.add_argument("-o", "--out", type=out_arg, required=True, help="output folder")
    parser.add_argument("--max-share", type=float, default=0.1, help="largest fraction of the kept particles per superclass (default %(default)s)")
    parser.add_argument("--n-superclasses", type=int, default=None, help="number of superclasses (default: automatic, classes with correlation >= 0.9 grouped)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="random seed for the particles dropped (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from cryo2d.rebalance import rebalance  # here, not at the top: scipy.cluster would load for every command

    result = rebalance(args.job, args.out, max_share=args.max_share, n_superclasses=args.n_superclasses, seed=args.seed)
    print("superclass distribution, before -> after:")
    for line in result.distribution():
        print("  " + line)
    for note in result.notes:
        print(f"note: {note}")
    kept, total = int(result.keep.sum()), len(result.keep)
    print(f"kept {kept} of {total} particles ({total - kept} dropped, cap {result.cap} per superclass) -> {result.paths['particles'].parent}")
    return 0
