"""2D classification of a particle stack (RELION STAR, CryoSPARC .cs or an exported result group .csg).

Online expectation-maximisation as in CryoSPARC's 2D classification: batches
of --batch-per-class x --classes particles for --online-iterations, then
--full-iterations passes over every particle. Writes classes.mrcs,
classes.star, particles.star (or particles.cs with its result group
particles.csg, for CryoSPARC's Import Result Group), gallery.png and
iterations.jsonl into the job folder.

Examples:

  $ cryo2d classify Extract/job012/particles.star -o Class2D/run1 --classes 50
  $ cryo2d classify J12_particles.cs --project-dir /data/P3 -o c2d --classes 100 --max-res 8
  $ cryo2d classify P3/exports/groups/P3_J12_particles/P3_J12_particles_exported.csg -o c2d
  $ cryo2d classify stain.star -o c2d --no-ctf --classes 20 --mask-diameter 180
  $ cryo2d classify particles.star -o c2d --workers 4               # local Dask cluster
  $ cryo2d classify particles.star -o c2d --scheduler tcp://node1:8786
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

from cryo2d.em.config import STARTS, EMConfig, check_device
from cryo2d.errors import Cryo2DError


def _on_off(parser: argparse.ArgumentParser, name: str, default, help_on: str) -> None:
    dest = name.replace("-", "_")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=default, help=help_on)
    group.add_argument(f"--no-{name}", dest=dest, action="store_false")


def device_arg(value: str) -> str:
    """argparse type of ``--device``: cpu, cuda or cuda:N, present on this machine."""
    try:
        return check_device(value)
    except Cryo2DError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def seed_arg(value: str) -> int:
    """argparse type of ``--seed``: a whole number of at least 0 (numpy's seeds)."""
    if (n := _whole_number(value)) < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (seeds are whole numbers from 0)")
    return n


def out_arg(value: str) -> str:
    """argparse type of ``-o/--out``: a folder name that is not empty (an empty one meant the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty (give the folder to write)")
    return value


def full_iterations_arg(value: str) -> int:
    """argparse type of ``--full-iterations``: a whole number of at least 1 (the last full pass gives every particle its class)."""
    if (n := _whole_number(value)) < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 (the last full pass gives every particle its class)")
    return n


def threads_arg(value: str) -> int:
    """argparse type of ``--threads``: a whole number of at least 1."""
    if (n := _whole_number(value)) < 1:
        raise argparse.ArgumentTypeError(f"{value} is fewer than 1 thread")
    return n


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Every classification parameter (DESIGN §2); shared with other commands."""
    d = EMConfig()
    p.add_argument("-o", "--out", type=out_arg, required=True, help="job folder to write")
    p.add_argument("--classes", type=int, default=d.n_classes, help="number of classes K (default %(default)s)")
    p.add_argument("--max-res", type=float, default=d.max_res_angst, help="resolution of the classes during the iterations and of the search, Å (default %(default)s)")
    p.add_argument("--average-res", type=float, default=None,
                   help="resolution of the written class averages, Å: a last pass rebuilds each class at it from its "
                        "particles' final poses (default: Nyquist; equal to --max-res: no pass)")
    p.add_argument("--max-align-res", type=float, default=None, help="highest resolution used in alignment, Å (default: --max-res)")
    p.add_argument("--min-align-res", type=float, default=None, help="lowest resolution used in alignment (high-pass), Å")
    p.add_argument("--start", choices=STARTS, default=d.start,
                   help="starting classes: grown from one class by binary splitting, aligned with each other "
                        "(default: purer classes, sharper averages, about 15%% more time), or random subsets at "
                        "random angles (RELION's and CryoSPARC's start)")
    p.add_argument("--online-iterations", type=int, default=d.n_online_iterations, help="online-EM iterations (default %(default)s)")
    p.add_argument("--batch-per-class", type=int, default=d.batch_size_per_class, help="particles per class per online iteration (default %(default)s)")
    p.add_argument("--full-iterations", type=full_iterations_arg, default=d.n_full_iterations, help="final passes over all particles, at least 1 (default %(default)s)")
    p.add_argument("--uncertainty-factor", type=float, default=d.uncertainty_factor, help="initial classification uncertainty factor (default %(default)s)")
    p.add_argument("--anneal-start", type=int, default=d.anneal_start, help="online iteration where noise annealing starts (default %(default)s)")
    p.add_argument("--anneal-iterations", type=int, default=d.anneal_iterations, help="online iterations of noise annealing (default %(default)s)")
    p.add_argument("--white-noise", action="store_true", help="one noise variance for all frequencies")
    fm = p.add_mutually_exclusive_group()
    fm.add_argument("--force-max", dest="force_max", action="store_true", default=None, help="take each particle at its best angle and shift instead of averaging over its probable ones: in each probable class, weighted by the class's posterior, with fewer than 128 particles per class, else in its best class alone (default: on when K > 20)")
    fm.add_argument("--no-force-max", dest="force_max", action="store_false", help="average each class over the particle's probable angles and shifts")
    p.add_argument("--mask-diameter", type=float, default=None, help="circular mask diameter, Å (default: corners only)")
    p.add_argument("--mask-diameter-outer", type=float, default=None, help="outer diameter of the soft mask edge, Å (default 1.2 x inner)")
    _on_off(p, "recenter", True, "re-centre classes each iteration (default on)")
    p.add_argument("--recenter-threshold", type=float, default=d.recenter_threshold, help="fraction of the maximum used for re-centring (default %(default)s)")
    p.add_argument("--zeropad", type=int, default=d.zeropad, help="Fourier oversampling for rotations (default %(default)s)")
    p.add_argument("--estimate-scale", action="store_true", help="estimate a per-particle scale factor (written as _rlnNormCorrection; normalised to a median of 1)")
    p.add_argument("--clamp-solvent", action="store_true", help="classes zero outside the mask")
    p.add_argument("--non-negative", action="store_true", help="classes non-negative")
    p.add_argument("--align-filaments", action="store_true", help="rotate final classes so the long axis is vertical")
    p.add_argument("--no-ctf", dest="use_ctf", action="store_false", help="no CTF (negative stain)")
    ic = p.add_mutually_exclusive_group()
    ic.add_argument("--invert-contrast", dest="invert_contrast", action="store_true", default=None,
                    help="multiply the images by -1 (protein dark in the stack; .cs: on top of blob/sign). "
                         "Default: only when the particles look dark, with a note")
    ic.add_argument("--no-invert-contrast", dest="invert_contrast", action="store_false",
                    help="use the images as they are, even when they look dark")
    p.add_argument("--psi-step", type=float, default=None, help="in-plane angular step, degrees (default: from resolution)")
    p.add_argument("--shift-range", type=float, default=None,
                   help="largest shift searched, px, around the particle's input shift, less than half the box "
                        "(default 10%% of the box)")
    _on_off(p, "input-shifts", True, "start each particle from the origin its STAR file gives (_rlnOriginX/Y[Angst] "
            "of an earlier job), as RELION's Class2D does; the written origins include it (default on)")
    p.add_argument("--shift-step", type=float, default=None, help="shift step, px (default from resolution: box / (4 x search radius in Fourier px), at least one working pixel)")
    p.add_argument("--exhaustive", dest="coarse_to_fine", action="store_false",
                   help="score every pose on the fine grid (default: coarse-to-fine search)")
    _on_off(p, "auto-mask", True, "the search masks each class around its own density, within the circular mask "
            "(default on)")
    _on_off(p, "flatten-solvent", True, "write the class averages masked as the search sees them (each class's own "
            "mask with --auto-mask, else the circular mask): zero outside the particle (default on)")
    _on_off(p, "hard-last", True, "final pass puts each particle in its best class only (default on)")
    _on_off(p, "empty-class", True, "from a quarter of the online iterations on (halfway with --start random), "
            "one class holds the empty boxes: particles that no class explains better than noise alone (default on)")
    dup = p.add_mutually_exclusive_group()
    dup.add_argument("--remove-duplicates", dest="remove_duplicates", action="store_true", default=True, help="keep one of each duplicate pick (default)")
    dup.add_argument("--keep-duplicates", dest="remove_duplicates", action="store_false")
    p.add_argument("--min-separation", type=float, default=None, help="duplicate distance, Å (default 0.5 x particle diameter)")
    p.add_argument("--no-sort", dest="sort_classes", action="store_false", help="keep classes in engine order")
    p.add_argument("--tau2-fudge", type=float, default=d.tau2_fudge, help="regularisation: signal power multiplier (default %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--threads", type=threads_arg, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--project-dir", default=None,
                   help="project folder that relative image paths start from: CryoSPARC's for .cs / .csg blob "
                        "paths, RELION's for STAR image names (looked in first)")
    p.add_argument("--skip-bad", action="store_true", help="drop images with NaN/Inf pixels (reported) instead of refusing")
    p.add_argument("--resume", action="store_true", help="continue from the job's checkpoint")


def add_scale_out_args(p: argparse.ArgumentParser) -> None:
    """``--workers`` / ``--scheduler`` (Dask, ``cryo2d.em.distributed``), for commands that pass them on."""
    dist = p.add_mutually_exclusive_group()
    dist.add_argument("--workers", type=int, default=None, metavar="N",
                      help="run the full iterations on a local Dask cluster of N single-threaded worker processes")
    dist.add_argument("--scheduler", default=None, metavar="ADDRESS",
                      help="run the full iterations on the workers of a running Dask scheduler, e.g. tcp://node1:8786")


def config_from_args(args: argparse.Namespace) -> EMConfig:
    return EMConfig(
        n_classes=args.classes,
        max_res_angst=args.max_res,
        average_res_angst=args.average_res,
        max_align_res_angst=args.max_align_res,
        min_align_res_angst=args.min_align_res,
        start=args.start,
        n_online_iterations=args.online_iterations,
        batch_size_per_class=args.batch_per_class,
        n_full_iterations=args.full_iterations,
        uncertainty_factor=args.uncertainty_factor,
        anneal_start=args.anneal_start,
        anneal_iterations=args.anneal_iterations,
        white_noise=args.white_noise,
        force_max=args.force_max,
        mask_diameter_angst=args.mask_diameter,
        mask_diameter_outer_angst=args.mask_diameter_outer,
        auto_mask=args.auto_mask,
        flatten_solvent=args.flatten_solvent,
        recenter=args.recenter,
        recenter_threshold=args.recenter_threshold,
        zeropad=args.zeropad,
        estimate_scale=args.estimate_scale,
        clamp_solvent=args.clamp_solvent,
        non_negative=args.non_negative,
        align_filaments=args.align_filaments,
        use_ctf=args.use_ctf,
        invert_contrast=args.invert_contrast,
        psi_step_deg=args.psi_step,
        shift_range_px=args.shift_range,
        input_shifts=args.input_shifts,
        shift_step_px=args.shift_step,
        hard_last=args.hard_last,
        empty_class=args.empty_class,
        coarse_to_fine=args.coarse_to_fine,
        remove_duplicates=args.remove_duplicates,
        min_separation_angst=args.min_separation,
        sort_classes=args.sort_classes,
        seed=args.seed,
        tau2_fudge=args.tau2_fudge,
    )


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("particles", help="particles.star (RELION), particles.cs or an exported .csg (CryoSPARC)")
    add_engine_args(p)
    add_scale_out_args(p)


@contextmanager
def progress_printer(total: int):
    """A tqdm bar plus one log line per iteration on stderr; yields the ``on_iteration`` callback.

    The bar shows after a second and is cleared when the block raises, so an
    input error found while the job starts is one line, not an empty bar and
    the error. When stderr is not a terminal (a cluster job's log file,
    ``2> run.log``) there is no bar: its carriage-return redraws would fill
    the log between the iteration lines, which then are the progress.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, desc="2D classification", unit="it", file=sys.stderr, leave=True, delay=1.0,
               disable=None)  # None: tqdm's own off switch when stderr is not a terminal

    def on_iteration(r: dict) -> None:
        if r["phase"] == "average":
            bar.write(f"class averages at {r['resolution_angst']:.2f} Å from {r['particles']} particles' final poses "
                      f"{r['time_s']:.1f}s", file=sys.stderr)
            return
        bar.update(1)
        bar.write(
            f"iter {r['iteration']:3d} {r['phase']:6s} n={r['particles']:7d} res={r['resolution_angst']:6.2f} Å "
            f"psi={r['psi_step_deg']:g}° shifts={r['n_shifts']} T={r['temperature']:.2f} "
            f"changes={100 * r['class_changes']:5.1f}% {r['time_s']:.1f}s"
            + (f" (references of {r['sampled_reference_classes']} classes sampled per chunk: memory budget)"
               if r.get("sampled_reference_classes") else ""),
            file=sys.stderr,
        )

    try:
        yield on_iteration
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def empty_class_summary(counts: Sequence[float], empty_class: int) -> str | None:
    """The run summary's line on the empty-box class (0-based ``empty_class``, -1: none), 1-based as written."""
    if empty_class < 0:
        return None
    n = int(counts[empty_class])
    held = f"holds the empty boxes ({n} particles)" if n else "is the empty-box class; no image looked empty"
    return f"class {empty_class + 1} {held}"


def print_note(source, text: str) -> None:
    """``source: text`` on stderr, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"{source}: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import torch

    from cryo2d.classify import classify

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    config.validate()
    total = config.n_online_iterations + max(config.n_full_iterations, 1)
    with progress_printer(total) as on_iteration:
        result = classify(
            args.particles, args.out, config, device=args.device, project_dir=args.project_dir,
            resume=args.resume, skip_bad=args.skip_bad, on_iteration=on_iteration,
            workers=args.workers, scheduler=args.scheduler, on_note=partial(print_note, args.particles),
        )
    n_classes = int((result.counts > 0).sum())
    print(f"{args.out}: {n_classes} non-empty classes of {len(result.counts)}; "
          f"{int(result.counts.sum())} particles assigned", file=sys.stderr)
    if (line := empty_class_summary(result.counts, result.empty_class)) is not None:
        print(f"{args.out}: {line}", file=sys.stderr)
    if result.n_duplicates:
        print(f"{args.out}: removed {result.n_duplicates} duplicate picks (written to duplicates file)", file=sys.stderr)
    if result.n_bad:
        print(f"{args.out}: skipped {result.n_bad} images with NaN/Inf pixels", file=sys.stderr)
    if result.ctf_note:
        print(f"{args.particles}: {result.ctf_note}", file=sys.stderr)
    return 0
