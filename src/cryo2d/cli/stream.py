"""Streaming 2D classification of particles that are still arriving (CryoSPARC Live style).

SOURCE is a folder that an extraction job writes particle files into
(*.star or *.cs, each with its MRC stacks), or one STAR/.cs file that grows.
A file is read once it and its stacks have not changed for --settle-seconds.
The first update runs when --batch-per-class x --classes x
--online-iterations particles are there (the batch job's whole schedule on
them); after that, one full iteration over all particles each time
--batch-per-class x --classes x 2 new ones have arrived. After each update
the job folder holds what `classify` writes, plus stream.json (update
counter, "status": "complete" once that update's files are all written),
updates.jsonl and stream_checkpoint.pt. Running the same command again
continues where it stopped; Ctrl-C stops cleanly.

Examples:

  $ cryo2d stream Extract/job012/Movies -o Class2D/live --classes 50
  $ cryo2d stream Extract/job012/particles.star -o live --classes 20 --until 10
  $ cryo2d stream incoming/ -o live --classes 8 --batch-per-class 50 --stop-when-idle 600
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time

from cryo2d.cli.classify import add_engine_args, add_scale_out_args, config_from_args


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder receiving particle files, or one growing .star/.cs file")
    add_engine_args(p)
    for action in p._actions:
        if action.dest == "resume":
            action.help = "continue the job's stream where it stopped (the default)"
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over, ignoring the job folder's stream checkpoint")
    p.set_defaults(resume=True)
    p.add_argument("--settle-seconds", type=float, default=5.0,
                   help="a file and its stacks count as complete once unchanged this long (default %(default)s)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="time between looks at SOURCE (default %(default)s)")
    p.add_argument("--until", type=int, default=None, metavar="N",
                   help="stop once the job's update counter reaches N (counted across restarts)")
    add_scale_out_args(p)
    p.add_argument("--stop-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop when nothing new has arrived for this long, after a last update over "
                        "any particles still waiting")


def run(args: argparse.Namespace) -> int:
    import torch

    from cryo2d.errors import Cryo2DError
    from cryo2d.stream import stream

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("settle_seconds", "poll_seconds", "stop_when_idle"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):  # inf would never settle, or overflow a sleep
            raise Cryo2DError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("settle_seconds", "stop_when_idle"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise Cryo2DError(f"--{name.replace('_', '-')} must be >= 0")
    if not args.poll_seconds > 0:  # 0 would look at SOURCE in a busy loop
        raise Cryo2DError("--poll-seconds must be positive")
    if args.until is not None and args.until < 1:
        raise Cryo2DError("--until must be at least 1")
    config = config_from_args(args)
    config.validate()
    # A cluster's SIGTERM stops the stream as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()

    def on_update(s: dict) -> None:
        print(f"update {s['update']:4d}: {s['particles']} particles (+{s['new_particles']}), "
              f"{s['nonempty_classes']} classes, best {s['best_resolution_angst']:.1f} Å, "
              f"{s['time_s']:.1f}s, at {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)

    def on_iteration(r: dict) -> None:
        changes = f"changes={100 * r['class_changes']:5.1f}% " if "class_changes" in r else ""
        print(f"  iter {r['iteration']:3d} {r['phase']:6s} n={r['particles']:7d} res={r['resolution_angst']:6.2f} Å "
              f"{changes}{r['time_s']:.1f}s", file=sys.stderr, flush=True)

    def on_note(text: str) -> None:
        print(f"{args.out}: {text}", file=sys.stderr, flush=True)

    result = stream(
        args.source, args.out, config, device=args.device, project_dir=args.project_dir,
        settle_s=args.settle_seconds, poll_s=args.poll_seconds, until=args.until,
        idle_stop_s=args.stop_when_idle, resume=args.resume, skip_bad=args.skip_bad,
        on_update=on_update, on_iteration=on_iteration, on_note=on_note,
        workers=args.workers, scheduler=args.scheduler,
    )
    why = {"until": f"reached update {args.until}", "idle": "nothing new arrived",
           "interrupted": "interrupted", "stop": "stopped"}[result.stopped]
    print(f"{args.out}: {why}; {result.updates} update{'' if result.updates == 1 else 's'}, {result.n_particles} particles classified"
          + (f", {result.n_pending} waiting" if result.n_pending else "")
          + (f", {result.n_skipped} skipped for NaN/Inf pixels" if result.n_skipped else "")
          + "; run the same command again to continue", file=sys.stderr)
    return 0
