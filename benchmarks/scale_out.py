"""Cost of running the full iterations on Dask workers (issue 7), and what a shard sends.

Part 1 times the same classification twice on simulated data: in one
process with 2 torch threads, and with its full iterations on a local Dask
cluster of 2 single-threaded worker processes (online iterations stay on the
client, which also has 2 threads). Each mode runs in its own subprocess,
alternating, ``--repeats`` times; the table gives the best and the median. The overhead is
(distributed − single) / single over the full iterations ("cold": the first,
which includes the workers' imports and opening the particle file; "warm":
the later ones) and over the whole run.

Part 2 lists, per shard and per full iteration, the bytes sent to a worker
(class transforms, noise model, plan; then 12 B per particle for its indices
and scales) and received back (class-frame sums; then per particle its
results and per-shell residuals), and the worker's memory for the M-step
sums, against K and the box (pixel size 1 Å, --max-res 6 Å, the E-step at
full resolution). Sizes are pickled sizes, what Dask sends.

    python benchmarks/scale_out.py                  # both parts
    python benchmarks/scale_out.py --part bytes     # part 2 only (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _config(args):
    from cryo2d.em.config import EMConfig

    return EMConfig(n_classes=args.classes, n_online_iterations=args.online, batch_size_per_class=args.batch,
                    n_full_iterations=args.full, seed=0)


def run_mode(args) -> None:
    """One timed classification in this process; prints a JSON line."""
    import torch

    from cryo2d.em.engine import run_em
    from cryo2d.io import read_particles

    torch.set_num_threads(2)
    particles = read_particles(Path(args.data) / "particles.star")
    config = _config(args)
    out: dict = {"mode": args.mode}
    t0 = time.perf_counter()
    if args.mode == "single":
        result = run_em(particles, config)
    else:
        from cryo2d.em.distributed import DaskPass, dask_client, source_of

        passes = []
        with dask_client(workers=2) as client:
            t_start = time.perf_counter() - t0

            def make_pass(engine):
                passes.append(DaskPass(client, source_of(particles), engine))
                return passes[-1]

            result = run_em(particles, config, make_pass=make_pass)
            out["worker_rss_mb"] = sorted(v / 1024.0 for v in client.run(
                lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values())
        out["cluster_start_s"] = t_start
        out["passes"] = [{k: s[k] for k in ("iteration", "shard_sizes", "bytes_sent", "bytes_received", "time_s")}
                         for s in passes[0].stats]
    out["wall_s"] = time.perf_counter() - t0
    out["rss_mb"] = _peak_rss_mb()
    out["full_s"] = [r["time_s"] for r in result.history if r["phase"] == "full"]
    out["online_s"] = sum(r["time_s"] for r in result.history if r["phase"] == "online")
    np.save(Path(args.data) / f"classes_{args.mode}.npy", result.classes)
    print(json.dumps(out))


def part_overhead(args) -> list[str]:
    from cryo2d.simulate import bundled_map_path, read_map, simulate, write_simulation

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate(*read_map(bundled_map_path()), n_particles=args.n, box=args.box, snr=0.1, seed=0)
        write_simulation(sim, Path(tmp))
        runs: dict[str, list[dict]] = {"single": [], "dask": []}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for mode in ("single", "dask"):
                cmd = [sys.executable, __file__, "--mode", mode, "--data", tmp, *_shared_flags(args)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                load.append(os.getloadavg()[0])
        a, b = np.load(Path(tmp) / "classes_single.npy"), np.load(Path(tmp) / "classes_dask.npy")
        class_diff = float(np.abs(a - b).max() / np.abs(a).max())

    def med(mode, fn):
        return statistics.median(fn(r) for r in runs[mode])

    def best(mode, fn):
        return min(fn(r) for r in runs[mode])

    cold = lambda r: r["full_s"][0]  # noqa: E731
    warm = lambda r: float(np.mean(r["full_s"][1:]))  # noqa: E731
    full = lambda r: sum(r["full_s"])  # noqa: E731
    wall = lambda r: r["wall_s"]  # noqa: E731
    lines.append(f"{args.n} particles, {args.box} px, K = {args.classes}, {args.online} online iterations of "
                 f"{args.batch}/class, {args.full} full; {args.repeats} runs per mode (alternating), "
                 f"best / median; load average {min(load):.1f}-{max(load):.1f} (2 cores)")
    lines.append("")
    lines.append("| | 1 process, 2 threads | 2 workers × 1 thread | overhead, best / median |")
    lines.append("|---|---|---|---|")
    for name, fn in (("first full iteration, s", cold), ("later full iterations (mean), s", warm),
                     ("all full iterations, s", full), ("whole run (incl. online + cluster start), s", wall)):
        sb, db, sm, dm = best("single", fn), best("dask", fn), med("single", fn), med("dask", fn)
        lines.append(f"| {name} | {sb:.2f} / {sm:.2f} | {db:.2f} / {dm:.2f} "
                     f"| {100 * (db - sb) / sb:+.0f} % / {100 * (dm - sm) / sm:+.0f} % |")
    rss_s = med("single", lambda r: r["rss_mb"])
    rss_c = med("dask", lambda r: r["rss_mb"])
    rss_w = med("dask", lambda r: sum(r["worker_rss_mb"]))
    lines.append(f"| peak RSS (median), MB | {rss_s:.0f} | client {rss_c:.0f} + workers {rss_w:.0f} | |")
    p = runs["dask"][0]["passes"][-1]
    lines.append("")
    lines.append(f"Cluster start {med('dask', lambda r: r['cluster_start_s']):.1f} s (in the whole-run figure); "
                 f"per full iteration {len(p['shard_sizes'])} shards of {p['shard_sizes']} particles, "
                 f"{p['bytes_sent'] / 1e3:.0f} kB sent, {p['bytes_received'] / 1e3:.0f} kB received; "
                 f"classes differ by {class_diff:.1e} of their maximum. Single-run full iterations: "
                 + ", ".join(f"{r['full_s']}" for r in runs["single"]) + "; distributed: "
                 + ", ".join(f"{r['full_s']}" for r in runs["dask"]) + ".")
    return lines


def _shared_flags(args) -> list[str]:
    return ["--classes", str(args.classes), "--online", str(args.online), "--batch", str(args.batch),
            "--full", str(args.full)]


def part_bytes(args) -> list[str]:
    """Bytes per shard and iteration against K and box (exact pickled sizes of the tasks and results)."""
    import pandas as pd
    import torch

    from cryo2d.em.config import EMConfig
    from cryo2d.em.distributed import DaskPass, ParticleSource, _shard_to_wire
    from cryo2d.em.engine import Engine, ShardSums
    from cryo2d.io import ArrayStack
    from cryo2d.particles import ParticleSet

    def engine(box: int, K: int) -> Engine:
        n = 2000  # no pass runs: the stack holds one image, the set is as long as the largest shard
        images = np.zeros((1, box, box), dtype=np.float32)
        particles = ParticleSet(ArrayStack(images), None, np.full(n, 1.0), pd.DataFrame(index=range(n)),
                                Path("mem"), "star")
        eng = Engine(particles, EMConfig(n_classes=K, use_ctf=False, seed=0))
        eng.state.r_res = eng.geom.r_align  # the E-step at full resolution (the last iterations)
        return eng

    # dtypes of the per-particle results, from one real pass
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 32, 32)).astype(np.float32)
    small = Engine(ParticleSet(ArrayStack(images), None, np.full(16, 1.0), pd.DataFrame(index=range(16)),
                               Path("mem"), "star"), EMConfig(n_classes=3, use_ctf=False, seed=0))
    small.initialise()
    per_dtypes = {k: (v.dtype, v.shape[1:]) for k, v in
                  small.pass_shard(np.arange(8), small.plan(9, online=False), "hard_class").per.items()}

    def sizes(eng: Engine, b: int) -> tuple[int, int]:
        plan = eng.plan(9, online=False)
        dp = DaskPass(None, ParticleSource("particles.star"), eng)
        sent = len(pickle.dumps(dp.tasks(np.arange(b), plan, "hard_class", 1)[0], protocol=5))
        m, K = len(eng.mpts), eng.K
        sums = ShardSums(torch.zeros((K, m), dtype=torch.complex64), torch.zeros((K, m)),
                         torch.zeros(K, dtype=torch.float64), torch.zeros((b, eng.n_shells), dtype=torch.float64),
                         {k: np.zeros((b, *shape), dtype=dt) for k, (dt, shape) in per_dtypes.items()})
        return sent, len(pickle.dumps(_shard_to_wire(sums), protocol=5))

    lines = ["| K | box px | M-step points m | shells | psi steps R | sent per shard, kB | + sent per particle, B "
             "| received per shard, kB | + received per particle, B | worker M-step sums K·R·m·12 B, MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for box in args.bytes_boxes:
        for K in args.bytes_classes:
            eng = engine(box, K)
            s1, r1 = sizes(eng, 1000)
            s2, r2 = sizes(eng, 2000)
            ds, dr = (s2 - s1) / 1000, (r2 - r1) / 1000
            R = len(eng.plan(9, online=False).psi_rad)
            m = len(eng.mpts)
            lines.append(f"| {K} | {box} | {m} | {eng.n_shells} | {R} | {(s1 - 1000 * ds) / 1e3:.0f} | {ds:.0f} "
                         f"| {(r1 - 1000 * dr) / 1e3:.0f} | {dr:.0f} | {K * R * m * 12 / 1e6:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "overhead", "bytes"), default="all")
    ap.add_argument("--n", type=int, default=3000, help="particles (part 1)")
    ap.add_argument("--box", type=int, default=64, help="box, px (part 1)")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--online", type=int, default=2, help="online iterations (part 1)")
    ap.add_argument("--batch", type=int, default=50, help="particles per class per online iteration (part 1)")
    ap.add_argument("--full", type=int, default=3, help="full iterations (part 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bytes-classes", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--bytes-boxes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--mode", choices=("single", "dask"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        run_mode(args)
        return
    if args.part in ("all", "overhead"):
        print("\n".join(part_overhead(args)), flush=True)
        print()
    if args.part in ("all", "bytes"):
        print("\n".join(part_bytes(args)))


if __name__ == "__main__":
    main()
