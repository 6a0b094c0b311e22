"""Peak memory of ``cryo2d classify`` as the number of particles grows (issue 4).

Simulates a base set once (``cryo2d simulate``, cached under
``benchmarks/_cache/sim``), then writes one big stack by tiling it: copy c of
the base images gets fresh Gaussian noise (copy 0 is the base set itself), is
written in chunks of ``--chunk`` images (the stack is never held in memory)
and gets its own micrograph names in the STAR file, so that duplicate-pick
removal does not fold the copies onto each other. The CTF and every other
column are copied from the base STAR file. Each row of the table classifies
the first N particles of that one stack (a STAR file per N, same stack) in a
fresh child process and reads its peak RSS from ``os.wait4``; everything
else (simulating, tiling) also runs in child processes, because a forked
child's peak RSS starts from its parent's.

    $ python benchmarks/memory.py                       # 10k, 50k, 200k x 128 px, K = 50
    $ python benchmarks/memory.py --sizes 2000,4000 --box 64 --base 2000 --keep

The big stack (13.1 GB for 200,000 x 128 px float32) is deleted at the end
unless ``--keep`` is given. The first row is a trivial ``python -c "import
torch"`` child: the floor every Python + PyTorch process pays.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, cryo2d_exe, simulate, timed_run  # noqa: E402

HEADER_BYTES = 1024


def tile_stack(base_star: Path, n_total: int, out_dir: Path, seed: int, noise: float, chunk: int) -> Path:
    """Write ``out_dir/tiled.mrcs`` (n_total images) and ``out_dir/all.star`` from a base STAR + stack.

    Run in a child process (``--_tile``): memory stays at about ``chunk``
    images plus the base STAR table.
    """
    import mrcfile
    import numpy as np
    import pandas as pd
    import starfile

    blocks = starfile.read(base_star, always_dict=True)
    base = blocks["particles"]
    names = base["rlnImageName"].str.split("@", n=1, expand=True)
    stacks = names[1].unique()
    assert len(stacks) == 1, "the base set must be one stack"
    base_stack = base_star.parent / stacks[0]
    image_no = names[0].astype(np.int64).to_numpy() - 1
    with mrcfile.open(base_stack, mode="r", permissive=True) as mrc:
        header = mrc.header.copy()
        images = np.asarray(mrc.data[image_no], dtype=np.float32)  # base set in STAR order
    n_base, box = len(images), images.shape[-1]
    sigma = noise * float(images.std())
    header.nz = n_total
    header.nsymbt = 0
    header.exttyp = b"\0\0\0\0"
    out_dir.mkdir(parents=True, exist_ok=True)
    stack_path = out_dir / "tiled.mrcs"
    rng = np.random.default_rng(seed)
    tables = []
    with open(stack_path, "wb") as f:
        f.write(header.tobytes())
        for start in range(0, n_total, chunk):
            stop = min(start + chunk, n_total)
            rows = np.arange(start, stop)
            copy, j = rows // n_base, rows % n_base
            block = images[j]
            fresh = copy > 0
            block[fresh] += sigma * rng.standard_normal((int(fresh.sum()), box, box), dtype=np.float32)
            f.write(block.astype("<f4" if header.mode.dtype.byteorder in "<=|" else ">f4").tobytes())
    assert os.path.getsize(stack_path) == HEADER_BYTES + n_total * box * box * 4
    for copy in range((n_total + n_base - 1) // n_base):
        rows = np.arange(copy * n_base, min((copy + 1) * n_base, n_total))
        part = base.iloc[: len(rows)].copy()
        part["rlnImageName"] = [f"{i + 1:06d}@tiled.mrcs" for i in rows]
        if "rlnMicrographName" in part:
            part["rlnMicrographName"] = part["rlnMicrographName"].astype(str) + f"_copy{copy:03d}"
        tables.append(part)
    blocks["particles"] = pd.concat(tables, ignore_index=True)
    starfile.write(blocks, out_dir / "all.star", overwrite=True)
    return out_dir / "all.star"


def first_n(star: Path, n: int) -> Path:
    """``first{n}.star`` beside ``star``: its first n particles (same stack), in a child process."""
    path = star.parent / f"first{n}.star"
    if not path.exists():
        code = (
            "import starfile, sys; d = starfile.read(sys.argv[1], always_dict=True); "
            "d['particles'] = d['particles'].iloc[:int(sys.argv[2])]; "
            "starfile.write(d, sys.argv[3], overwrite=True)"
        )
        run_child([sys.executable, "-c", code, str(star), str(n), str(path)], star.parent / f"first{n}.log")
    return path


def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` with one thread; (wall s, peak RSS MB). Exit on failure."""
    code, wall, rss, _ = timed_run(cmd, log)
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {shlex.join(cmd)}; see {log}")
    return wall, rss


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r + [""] * (len(headers) - len(r))) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000,200000", help="particle counts, comma-separated")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--base", type=int, default=10000, help="particles simulated (then tiled)")
    ap.add_argument("--noise", type=float, default=0.5, help="fresh noise per copy, x the base images' std")
    ap.add_argument("--chunk", type=int, default=2000, help="images per write when tiling")
    ap.add_argument("--online-iterations", type=int, default=5)
    ap.add_argument("--batch-per-class", type=int, default=20)
    ap.add_argument("--full-iterations", type=int, default=1)
    ap.add_argument("--classify-args", default="", help="more cryo2d classify flags, quoted")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the big tiled stack")
    ap.add_argument("--_tile", nargs=3, metavar=("BASE_STAR", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._tile:
        tile_stack(Path(args._tile[0]), int(args._tile[1]), Path(args._tile[2]), args.seed, args.noise, args.chunk)
        return 0

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # children inherit
    sizes = [int(s) for s in args.sizes.split(",")]
    box, K = args.box, args.classes
    p = dict(n=args.base, box=box, snr=0.05, junk_fraction=0.1, views="uniform", n_views=20, rare_fraction=0.03)
    sim_dir = CACHE / "sim" / f"memory-n{args.base}-b{box}-s{args.seed}"
    simulate(p, sim_dir, args.seed, [])
    work = CACHE / "memory" / f"tiled-n{max(sizes)}-b{box}-base{args.base}-s{args.seed}"
    star = work / "all.star"
    stack = work / "tiled.mrcs"
    if not (star.exists() and stack.exists()):
        print(f"tiling {max(sizes)} images of {box} px into {stack} ...", flush=True)
        work.mkdir(parents=True, exist_ok=True)  # also makes CACHE / "memory" for the log
        wall, rss = run_child([sys.executable, __file__, "--_tile", str(sim_dir / "particles.star"), str(max(sizes)),
                               str(work), "--seed", str(args.seed), "--noise", str(args.noise),
                               "--chunk", str(args.chunk)], CACHE / "memory" / "tile.log")
        print(f"tiled in {wall:.0f} s (peak RSS {rss:.0f} MB)", flush=True)
    stack_gb = os.path.getsize(stack) / 1e9

    schedule = ["--online-iterations", str(args.online_iterations), "--batch-per-class", str(args.batch_per_class),
                "--full-iterations", str(args.full_iterations)]
    extra = shlex.split(args.classify_args)
    headers = ["particles", "box", "K", "stack on disk GB", "wall s", "full pass s", "peak RSS MB"]
    wall, rss = run_child([sys.executable, "-c", "import torch"], work / "import-torch.log")
    rows = [["`python -c \"import torch\"`", "", "", "", f"{wall:.1f}", "", f"{rss:.0f}"]]
    loads = [os.getloadavg()[0]]
    try:
        for n in sizes:
            sub = star if n == max(sizes) else first_n(star, n)
            job = work / f"job-n{n}-K{K}"
            cmd = [*cryo2d_exe(), "classify", str(sub), "-o", str(job), "--classes", str(K), *schedule,
                   "--threads", str(args.threads), "--seed", str(args.seed), *extra]
            print(f"classify: n={n} ... ({time.strftime('%H:%M:%S')})", flush=True)
            wall, rss = run_child(cmd, work / f"job-n{n}-K{K}.log")
            records = [json.loads(line) for line in (job / "iterations.jsonl").read_text().splitlines() if line.strip()]
            full = sum(r["time_s"] for r in records if r["phase"] == "full")
            size_gb = HEADER_BYTES / 1e9 + n * box * box * 4 / 1e9
            rows.append([f"{n:,}", str(box), str(K), f"{size_gb:.2f} (of {stack_gb:.1f})", f"{wall:.0f}",
                         f"{full:.0f}", f"{rss:.0f}"])
            gpu = [r["device_peak_mb"] for r in records if "device_peak_mb" in r]  # --device cuda
            if gpu:
                if "peak GPU MB" not in headers:
                    headers.append("peak GPU MB")
                rows[-1].append(f"{max(gpu):.0f}")
            print(f"  wall {wall:.0f} s, full pass {full:.0f} s, peak RSS {rss:.0f} MB"
                  + (f", peak GPU memory {max(gpu):.0f} MB" if gpu else ""), flush=True)
            loads.append(os.getloadavg()[0])
    finally:
        if not args.keep and stack.exists():
            stack.unlink()
            print(f"removed {stack} (--keep keeps it)", flush=True)
    print(f"\n### Peak RSS of cryo2d classify ({time.strftime('%Y-%m-%d')}; {args.threads} thread(s); "
          f"cryo2d classify ... {shlex.join(['--classes', str(K), *schedule, *extra])}; "
          f"load average {min(loads):.1f}-{max(loads):.1f})\n")
    print(table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
