"""How the automatic selection (``cryo2d select`` with no option) does on simulated data, per job.

For each SIM:JOB pair (a ``cryo2d simulate`` folder and a ``cryo2d classify``
job of its particles), the classes that the automatic junk score keeps are
scored against the simulation's truth: the share of the true particles in the
kept classes, of the junk images outside them, and of the rare view's
particles in the kept classes, with the median particles per class. No
selection folder is written: the classes are chosen as ``cryo2d select``
chooses them (``cryo2d.select.choose_classes``).

    $ cryo2d classify SIM/particles.star -o JOB --classes 50 --seed 0
    $ python benchmarks/select_scores.py SIM:JOB [SIM2:JOB2 ...]

Prints one table row per job (markdown).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cryo2d.evaluate import read_job_labels
from cryo2d.select import choose_classes, read_job


def score_selection(sim: Path, job_dir: Path) -> dict:
    """Median class size, good kept, junk removed and rare view kept (fractions) for the automatic selection."""
    truth = pd.read_csv(sim / "truth.csv")
    rare_view = json.loads((sim / "truth.json").read_text())["rare_view"]
    labels, _ = read_job_labels(job_dir / "particles.star", len(truth))
    job = read_job(job_dir)
    kept = np.isin(labels + 1, choose_classes(job))
    kind = truth["kind"].to_numpy()
    good, junk = kind == "particle", kind != "particle"
    rare = good & (truth["view"].to_numpy() == rare_view) if rare_view is not None else np.zeros(len(truth), bool)
    counts = job.counts
    return {
        "median_per_class": float(np.median(counts[counts > 0])),
        "good_kept": float(kept[good].mean()),
        "junk_removed": float((~kept[junk]).mean()) if junk.any() else float("nan"),
        "rare_kept": f"{int(kept[rare].sum())} / {int(rare.sum())}" if rare.any() else "n/a",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="SIM:JOB", help="simulation folder and classification job")
    args = parser.parse_args(argv)
    print("| job | particles per class (median) | good kept | junk removed | rare kept |")
    print("|---|---|---|---|---|")
    for pair in args.pairs:
        sim, _, job = pair.partition(":")
        s = score_selection(Path(sim), Path(job))
        print(f"| {job} | {s['median_per_class']:g} | {100 * s['good_kept']:.1f} % | "
              f"{100 * s['junk_removed']:.0f} % | {s['rare_kept']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
