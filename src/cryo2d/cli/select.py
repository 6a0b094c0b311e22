"""Keep the good classes of a classification job: write their particles and templates.

Writes OUT/particles.star (OUT/particles.cs when the job's input was .cs)
with the rows of the selected classes and every column kept, OUT/rejected.star
(or .cs) with the others (each .cs with its .csg), OUT/templates.mrcs with the
selected class averages (for template picking; also as OUT/templates.cs and
.csg for a CryoSPARC job) and OUT/classes.star. Class numbers are 1-based, as
in classes.star and the gallery.

Choose classes by number (--classes, --exclude) and/or by criteria; a class
must pass every criterion given. With no option at all, automatic selection
keeps the non-empty classes whose junk score is at most 0.5 (see
cryo2d.junk: low contrast, density at the box edge, off-centre, featureless
blob). Averages of fewer than about 100 particles can look like noise to the
junk score: when most classes are that small, a note says how many it
rejected. Resolutions are in Å, smaller = better: --min-res 20 keeps classes at
20 Å or better; --max-res 4 drops classes claiming better than 4 Å.

JOB may be a running cryo2d stream's folder: it is read between updates
(while stream.json says "writing", select waits for the update to be written).

OUT may be an earlier select (or rebalance) folder, re-run with other classes:
the files of those outputs that this run does not write go (particles.star
when it writes particles.cs). A classification job's folder (checkpoint.pt,
classes.mrcs, ...) or one holding particle files that select and rebalance
did not write (e.g. the job's input) is refused.

examples:
  $ cryo2d select Class2D/run1 -o Select/run1                  # automatic
  $ cryo2d select Class2D/run1 -o Select/good --classes 1,4,7-9
  $ cryo2d select Class2D/run1 -o Select/clean --exclude 2,3
  $ cryo2d select Class2D/run1 -o Select/strict --max-junk-score 0.3 --min-particles 50 --min-res 15
"""
from __future__ import annotations

import argparse

from cryo2d.cli.classify import out_arg
from cryo2d.select import (
    SelectionCriteria,
    applied_criteria,
    choose_classes,
    parse_class_list,
    read_job,
    small_classes_note,
    write_selection,
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="classification job folder (classes.mrcs, classes.star, particles.star/.cs)")
    parser.add_argument("-o", "--out", type=out_arg, required=True, help="output folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--classes", metavar="LIST", help="classes to keep, 1-based, e.g. 1,4,7-9")
    which.add_argument("--exclude", metavar="LIST", help="classes to drop, 1-based, e.g. 2,3")
    parser.add_argument("--min-particles", type=int, metavar="N", help="keep classes with at least N particles")
    parser.add_argument("--min-res", type=float, metavar="Å", help="lowest resolution accepted: keep classes with resolution <= this (Å)")
    parser.add_argument("--max-res", type=float, metavar="Å", help="highest resolution believed: keep classes with resolution >= this (Å)")
    parser.add_argument("--max-junk-score", type=float, metavar="S", help="keep classes with junk score <= S, in [0, 1] (automatic default 0.5)")


def criteria_from_args(args: argparse.Namespace) -> SelectionCriteria:
    return SelectionCriteria(
        min_particles=args.min_particles,
        min_res_angst=args.min_res,
        max_res_angst=args.max_res,
        max_junk_score=args.max_junk_score,
    )


def run(args: argparse.Namespace) -> int:
    job = read_job(args.job)
    classes = parse_class_list(args.classes, "--classes") if args.classes is not None else None
    exclude = parse_class_list(args.exclude, "--exclude") if args.exclude is not None else None
    criteria = criteria_from_args(args)
    chosen = choose_classes(job, classes=classes, exclude=exclude, criteria=criteria)
    result = write_selection(job, chosen, args.out)
    print(result.summary())
    note = small_classes_note(job, chosen, applied_criteria(classes, exclude, criteria), classes=classes, exclude=exclude)
    if note:
        print(note)
    return 0
