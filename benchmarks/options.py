"""Every documented ``cryo2d classify`` option, one at a time, on one simulated set: wall time and scores.

Runs the default job, then one job per option with a non-default value (the
same simulation, K and seed), each as its own ``cryo2d classify`` process, and
scores each against the simulation's truth (``cryo2d.evaluate.score_job``:
junk F1, purity, rare view kept, median NCC). Shows that each option runs and
what it costs or buys on this set; an option that changes nothing here says
so (the same labels, angles and shifts as the default job), e.g. the
duplicate-pick options on a set without duplicate picks.

    $ cryo2d simulate bundled -o SIM -n 1500 --box 48 --snr 0.1 --junk-fraction 0.1 --n-views 8 --seed 0
    $ python benchmarks/options.py SIM --out JOBS [--classes 12] [--only no-sort 'tau2-fudge 4' ...]

Prints a markdown table, one row per job, after one untimed default job (it
warms the file cache and loads Numba's compiled kernels). Nothing else may
run on the machine while it times.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import starfile

from cryo2d.evaluate import score_job

# Extra classify arguments of each job (its row is named by them); the first is the default job.
OPTIONS = [
    [],
    ["--max-res", "30"],
    ["--average-res", "30", "--max-res", "30"],
    ["--max-align-res", "30"],
    ["--min-align-res", "60"],
    ["--start", "split"],
    ["--online-iterations", "10"],
    ["--batch-per-class", "50"],
    ["--full-iterations", "3"],
    ["--uncertainty-factor", "1"],
    ["--anneal-start", "0", "--anneal-iterations", "5"],
    ["--white-noise"],
    ["--force-max"],
    ["--mask-diameter", "250"],
    ["--mask-diameter", "250", "--mask-diameter-outer", "320"],
    ["--no-recenter"],
    ["--recenter-threshold", "0.5"],
    ["--zeropad", "1"],
    ["--estimate-scale"],
    ["--clamp-solvent"],
    ["--non-negative"],
    ["--align-filaments"],
    ["--no-ctf"],
    ["--psi-step", "5"],
    ["--shift-range", "3"],
    ["--shift-step", "2"],
    ["--exhaustive"],
    ["--no-auto-mask"],
    ["--no-flatten-solvent"],
    ["--no-hard-last"],
    ["--no-empty-class"],
    ["--keep-duplicates"],
    ["--min-separation", "300"],
    ["--no-sort"],
    ["--tau2-fudge", "4"],
    ["--threads", "1"],
    ["--workers", "2"],
]


def _poses(job: Path) -> np.ndarray:
    """(n, 4) class, psi and origin of each particle, in the input's order (classes by particle set, not number)."""
    table = starfile.read(job / "particles.star", always_dict=True)["particles"]
    return table[["rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()


def run(sim: Path, out: Path, classes: int, name: str, args: list[str]) -> dict:
    job = out / name.strip("-").replace(" ", "_").replace("-", "")
    cmd = [sys.executable, "-m", "cryo2d", "classify", str(sim / "particles.star"), "-o", str(job),
           "--classes", str(classes), "--seed", "0", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"name": name, "wall": wall, "error": done.stderr.strip().splitlines()[-1:], "job": job}
    return {"name": name, "wall": wall, "scores": score_job(job, sim), "job": job}


def _same_result(a: Path, b: Path) -> bool:
    """The same partition into classes (numbers may differ: --no-sort), angles and origins."""
    pa, pb = _poses(a), _poses(b)
    if pa.shape != pb.shape:
        return False
    pairs = {tuple(p) for p in np.stack([pa[:, 0], pb[:, 0]], axis=1).tolist()}
    one_to_one = len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
    return one_to_one and np.allclose(pa[:, 1:], pb[:, 1:], atol=1e-3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sim", type=Path, help="a cryo2d simulate folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the jobs")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--only", nargs="*", metavar="NAME",
                        help="rows to run, without the leading dashes: no-sort 'tau2-fudge 4' (the default job always runs)")
    args = parser.parse_args(argv)
    rows = [(" ".join(extra) or "default", extra) for extra in OPTIONS]
    rows = [(name, extra) for name, extra in rows
            if name == "default" or not args.only or name.removeprefix("--") in args.only]
    run(args.sim, args.out / "warm-up", args.classes, "default", [])  # file caches, Numba's compiled kernels
    print("| option | wall s | junk F1 | purity | rare view kept | median NCC | note |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, extra in rows:
        r = run(args.sim, args.out, args.classes, name, extra)
        if "error" in r:
            print(f"| `{name}` | {r['wall']:.1f} | | | | | error: {' '.join(r['error'])} |", flush=True)
            continue
        s = r["scores"]
        note = ""
        if base is None:
            base = r["job"]
        elif _same_result(base, r["job"]):
            note = "same labels, angles and shifts as default"
        rare = {True: "yes", False: "no", None: "n/a"}[s["rare_view_recovered"]]
        print(f"| `{name}` | {r['wall']:.1f} | {s['junk_f1']:.3f} | {s['purity']:.3f} | {rare} | "
              f"{s['median_ncc']:.3f} | {note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
