"""How cryo2d's run time grows with particles, classes and box size.

Simulates one data set per box size (cached under ``benchmarks/_cache/sim``),
runs ``cryo2d classify`` on subsets as separate processes and reads each
job's ``iterations.jsonl`` to split the time into the online-EM phase (fixed
batches of ``--batch-per-class × K`` particles: must not grow with the
number of particles) and the full passes (must grow linearly). Prints one
table per sweep (wall s, online s, full s, full-pass µs per particle, peak
RSS) and draws a PNG per sweep into ``benchmarks/scaling_*.png``.

    $ pip install -e ".[bench]"                  # matplotlib, for the plots
    $ python benchmarks/scaling.py               # about 15 minutes on 2 cores
    $ python benchmarks/scaling.py --quick       # smaller sweeps, a few minutes

The load average at the start and end of each run is printed: on a loaded
machine the figures are contended.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, cryo2d_exe, simulate, timed_run  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent

FULL = {
    "particles": dict(box=64, classes=20, values=[1000, 2000, 4000, 8000, 16000]),
    "classes": dict(box=64, n=4000, values=[10, 20, 50, 100]),
    "box": dict(n=2000, classes=20, values=[32, 64, 96, 128]),
}
QUICK = {
    "particles": dict(box=48, classes=10, values=[500, 1000, 2000, 4000]),
    "classes": dict(box=48, n=1000, values=[5, 10, 20, 40]),
    "box": dict(n=500, classes=10, values=[32, 48, 64, 96]),
}
ONLINE_ITERATIONS = 10
BATCH_PER_CLASS = 50


def dataset(n: int, box: int, seed: int = 0) -> Path:
    """Simulated stack (uniform views, SNR 0.05, 10 % junk) with at least ``n`` particles."""
    p = dict(n=n, box=box, snr=0.05, junk_fraction=0.1, views="uniform", n_views=20, rare_fraction=0.03)
    sim_dir = CACHE / "sim" / f"scaling-n{n}-b{box}-s{seed}"
    simulate(p, sim_dir, seed, [])
    return sim_dir / "particles.star"


def subset_star(star: Path, n: int, out: Path) -> Path:
    """The first ``n`` particles of ``star`` (same stack), written once."""
    import starfile

    path = out / f"first{n}.star"
    if not path.exists():
        data = starfile.read(star, always_dict=True)
        data["particles"] = data["particles"].iloc[:n]
        out.mkdir(parents=True, exist_ok=True)
        starfile.write(data, path, overwrite=True)
        # image paths are relative to the STAR file's folder: keep the stack beside it
        for stack in star.parent.glob("*.mrcs"):
            link = out / stack.name
            if not link.exists():
                link.symlink_to(stack.resolve())
    return path


def run_one(star: Path, classes: int, tag: str, threads: int) -> dict:
    """Classify ``star`` in a fresh process; wall, CPU, RSS and the per-phase times."""
    job = CACHE / "scaling" / tag
    job.mkdir(parents=True, exist_ok=True)
    cmd = [*cryo2d_exe(), "classify", str(star), "-o", str(job), "--classes", str(classes),
           "--online-iterations", str(ONLINE_ITERATIONS), "--batch-per-class", str(BATCH_PER_CLASS),
           "--full-iterations", "1", "--threads", str(threads), "--seed", "0"]
    load0 = os.getloadavg()[0]
    code, wall, rss, cpu = timed_run(cmd, job.parent / f"{tag}.log")
    if code != 0:
        raise SystemExit(f"cryo2d classify failed for {tag} (exit {code}); see {job.parent / (tag + '.log')}")
    records = [json.loads(line) for line in (job / "iterations.jsonl").read_text().splitlines() if line.strip()]
    online = sum(r["time_s"] for r in records if r["phase"] == "online")
    full = sum(r["time_s"] for r in records if r["phase"] == "full")
    n_full = sum(r["particles"] for r in records if r["phase"] == "full")
    return dict(wall_s=wall, cpu_s=cpu, rss_mb=rss, online_s=online, full_s=full,
                full_us_per_particle=1e6 * full / max(n_full, 1), load=(load0, os.getloadavg()[0]))


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot(name: str, xs: list, rows: list[dict], xlabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for key, label in (("wall_s", "whole run"), ("online_s", "online-EM phase"), ("full_s", "full pass")):
        ax.plot(xs, [r[key] for r in rows], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time (s)")
    ax.set_title(f"cryo2d classify: time vs {name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sweeps (a few minutes)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", choices=["particles", "classes", "box"], action="append",
                    help="run only this sweep (repeatable)")
    args = ap.parse_args(argv)
    sweeps = QUICK if args.quick else FULL
    suffix = "-quick" if args.quick else ""
    headers = ["value", "wall s", "online s", "full s", "full µs/particle", "CPU s", "peak RSS MB", "load start/end"]
    for name, spec in sweeps.items():
        if args.only and name not in args.only:
            continue
        rows, xs = [], spec["values"]
        for v in xs:
            n = v if name == "particles" else spec["n"]
            box = v if name == "box" else spec["box"]
            K = v if name == "classes" else spec["classes"]
            full_n = max(spec["values"]) if name == "particles" else n
            star = dataset(full_n, box)
            if n < full_n:
                star = subset_star(star, n, CACHE / "scaling" / f"subsets-n{full_n}-b{box}")
            tag = f"{name}{suffix}-n{n}-b{box}-K{K}-t{args.threads}"
            print(f"{name}: n={n} box={box} K={K} ...", flush=True)
            rows.append(run_one(star, K, tag, args.threads))
        body = [[str(v), f"{r['wall_s']:.1f}", f"{r['online_s']:.1f}", f"{r['full_s']:.1f}",
                  f"{r['full_us_per_particle']:.0f}", f"{r['cpu_s']:.1f}", f"{r['rss_mb']:.0f}",
                  f"{r['load'][0]:.1f}/{r['load'][1]:.1f}"] for v, r in zip(xs, rows)]
        fixed = ", ".join(f"{k} {spec[k]}" for k in ("n", "box", "classes") if k in spec)
        print(f"\n### time vs {name} ({fixed}; {ONLINE_ITERATIONS} online iterations of "
              f"{BATCH_PER_CLASS} x K particles, 1 full pass, {args.threads} threads)\n")
        print(table(headers, body))
        png = BENCH_DIR / f"scaling_{name}{suffix}.png"
        plot(name, xs, rows, {"particles": "particles", "classes": "classes K", "box": "box (px)"}[name], png)
        growth = np.polyfit(np.log(xs), np.log([max(r["full_s"], 1e-3) for r in rows]), 1)[0]
        print(f"\nfull pass grows as {name}^{growth:.2f}; plot: {png.relative_to(BENCH_DIR.parent)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
