"""E-step throughput: poses scored per second and GFLOP/s, next to torch.matmul.

For each problem size, times the exhaustive E-step (cryo2d.em.estep.e_step),
the coarse-to-fine E-step, and a bare ``torch.matmul`` of the same shape as
the E-step's cross-term GEMM ((b·T × 2M) @ (2M × K·R)), measured in the same
run: the matmul rate is this machine's limit for the formulation. The
coarse-to-fine E-step gets its references' power and coarse references made
beforehand, as the engine makes them once per pass: "c2f" with a float32
coarse stage (two real products on half-turn pairs of rotations where the
engine makes them so, ``paired_coarse_ok``; "c2f f32 unpaired" is the one
complex-as-real product of before, n/a where pairs do not apply), "c2f bf16"
with the bfloat16 one the engine uses where the hardware multiplies bfloat16
natively (n/a elsewhere), "c2f int8" with the int8 one (on pairs where they
apply) that the engine uses on CPUs with AVX2 and without native bfloat16
(``int8_matmul_is_fast``; timed on any CPU with the Numba kernels, n/a
elsewhere). The heap is tuned as
the engine tunes it (``tune_allocator``), for both sides.

    python benchmarks/estep.py [--threads 2] [--repeat 3]
    python benchmarks/estep.py --device cuda --batch-scale 32   # a GPU: 32x the particles per chunk
"""
from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from cryo2d.em import kernels
from cryo2d.em.data import tune_allocator
from cryo2d.em.estep import (
    bf16_matmul_is_fast,
    coarse_references,
    coarse_subgrid,
    deshift_phases,
    e_step,
    e_step_coarse_to_fine,
    fine_chunk_for,
    paired_coarse_ok,
)
from cryo2d.em.geometry import disc_points
from cryo2d.em.rotation import psi_grid, rotate_classes
from cryo2d.fourier import fft2c, radius_grid

SIZES = [  # (box, classes, psi step, shift range px, particles per chunk)
    (48, 12, 3.0, 4.0, 64),
    (64, 20, 3.0, 6.0, 64),
    (64, 50, 5.0, 6.0, 32),
    (128, 50, 3.0, 6.0, 16),
]


def _best_time(fn, repeat: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def _problem(box: int, K: int, psi_step: float, shift_range: float, b: int):
    g = torch.Generator().manual_seed(0)
    pts = disc_points(box, 1.0, box / 2 - 1, half=True)
    classes = fft2c(torch.randn(K, box, box, generator=g)) * torch.exp(-(radius_grid(box) / (box / 6)) ** 2)
    psi = psi_grid(psi_step)
    refs = rotate_classes(classes, pts.xy, psi, 2)
    n = int(math.floor(shift_range))
    k = torch.arange(-n, n + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    keep = xx**2 + yy**2 <= shift_range**2
    shifts = torch.stack([xx[keep], yy[keep]], dim=1)
    phases = deshift_phases(pts.xy / box, shifts)
    X = torch.randn(b, len(pts), dtype=torch.complex64, generator=g)
    ctf = torch.ones(b, len(pts))
    inv = torch.ones(len(pts))
    grid = coarse_subgrid(shifts, 1.0, len(psi), pts.xy.norm(dim=1), box / 4)
    return X, ctf, inv, refs, phases, torch.zeros(K), torch.ones(b), grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--batch-scale", type=int, default=1, help="particles per chunk x this (a GPU wants more)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the engine does: freed intermediates reused, not faulted in afresh (both sides)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {name}")
    header = ("box", "K", "R", "T", "2M", "b", "exh poses/s", "exh GFLOP/s", "matmul GFLOP/s", "exh/matmul",
              "c2f poses/s", "c2f speed-up", "c2f f32 unpaired poses/s", "c2f bf16 poses/s", "c2f bf16 speed-up",
              "c2f int8 poses/s", "c2f int8 speed-up")
    bf16 = bf16_matmul_is_fast(dev)
    int8 = kernels.available(dev)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for box, K, psi_step, shift_range, b in SIZES:
        b *= args.batch_scale
        X, ctf, inv, refs, phases, prior, scale, grid = _problem(box, K, psi_step, shift_range, b)
        X, ctf, inv, refs, phases, prior, scale = (t.to(dev) for t in (X, ctf, inv, refs, phases, prior, scale))
        grid = type(grid)(*(t.to(dev) for t in grid))
        T, R, M = phases.shape[0], refs.shape[1], refs.shape[2]
        poses = b * T * K * R
        flops = 2.0 * b * T * K * R * 2 * M + 2.0 * b * M * K * R
        t_exh = _best_time(lambda: e_step(X, ctf, inv, refs, phases, prior, scale), args.repeat, dev)
        power = refs.abs().square()
        c2f = {}
        paired = paired_coarse_ok(psi_grid(psi_step, device=dev), grid, torch.float32)
        variants = [("f32", torch.float32, paired)] + [("f32 unpaired", torch.float32, False)] * paired
        variants += [("bf16", torch.bfloat16, False)] * bf16 + [("int8", torch.int8, paired)] * int8
        for key, dtype, pairs in variants:
            coarse = coarse_references(refs, grid, power, dtype, pairs=pairs)
            c2f[key] = _best_time(lambda: e_step_coarse_to_fine(
                X, ctf, inv, refs, phases, prior, scale, grid, refs_power=power, coarse_refs=coarse,
                fine_chunk=fine_chunk_for(dev)), args.repeat, dev)
        t_c2f = c2f["f32"]
        A = torch.randn(b * T, 2 * M, device=dev)
        B = torch.randn(2 * M, K * R, device=dev)
        t_mm = _best_time(lambda: A @ B, args.repeat, dev)
        mm_rate = 2.0 * b * T * 2 * M * K * R / t_mm / 1e9
        row = (box, K, R, T, 2 * M, b, f"{poses / t_exh:.3g}", f"{flops / t_exh / 1e9:.1f}", f"{mm_rate:.1f}",
               f"{(flops / t_exh / 1e9) / mm_rate:.2f}", f"{poses / t_c2f:.3g}", f"{t_exh / t_c2f:.1f}x",
               f"{poses / c2f['f32 unpaired']:.3g}" if paired else "n/a")
        t16 = c2f.get("bf16")
        row += (f"{poses / t16:.3g}", f"{t_exh / t16:.1f}x") if t16 else ("n/a", "n/a")
        t8 = c2f.get("int8")
        row += (f"{poses / t8:.3g}", f"{t_exh / t8:.1f}x") if t8 else ("n/a", "n/a")
        print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
