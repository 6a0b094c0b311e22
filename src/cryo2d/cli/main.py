"""The ``cryo2d`` command line: one sub-command per module in this package."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# PyTorch's OpenMP threads wait for work by spinning (GNU OpenMP: 300,000 turns), holding their
# cores. Beside another program on the same cores (RELION on 2 cores) each thread then waits for
# the other's time slice at every operation: a 48 px job took 31-40 s instead of 12 s with 10,000
# turns, which alone cost nothing (64 px job: 26.2-26.6 s against 26.4-26.5 s). Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) made the job alone 33 % slower. Read when torch loads OpenMP, so set
# before any command module imports torch; a value the user set is kept.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from cryo2d.errors import Cryo2DError  # noqa: E402

# Command name -> module under cryo2d.cli. Each module has a docstring (its
# help text), ``add_args(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "info": "info",
    "simulate": "simulate",
    "classify": "classify",
    "stream": "stream",
    "demo": "demo",
    "select": "select",
    "view": "view",
    "rebalance": "rebalance",
}


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options: `--force` would silently mean `--force-max`.
    parser = argparse.ArgumentParser(
        prog="cryo2d", description="Cryo-EM 2D classification (RELION STAR / CryoSPARC .cs in and out).",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"cryo2d.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        module.add_args(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What to lower: the classification options, where the command has them (not simulate --box 100000).
    less = f" {_LESS_MEMORY}" if hasattr(args, "psi_step") else ""
    try:
        return int(args.run(args) or 0)
    except Cryo2DError as err:
        print(f"cryo2d: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cryo2d: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cryo2d info X | head`: the reader has gone; quiet, as other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except MemoryError:
        print(f"cryo2d: error: out of memory (RAM).{less}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if _CPU_ALLOCATION_FAILED in str(err):  # torch's CPU allocator: a RuntimeError, not a MemoryError
            asked = re.search(r"allocate (\d+) bytes", str(err))
            size = f": {int(asked.group(1)) / 2**30:,.1f} GiB asked for at once" if asked else ""
            print(f"cryo2d: error: out of memory (RAM{size}).{less}", file=sys.stderr)
            return 1
        if not _gpu_out_of_memory(err):
            raise
        device = getattr(args, "device", "cuda")
        run_on_cpu = f"{less}, or run" if less else " Run"
        print(f"cryo2d: error: the GPU ran out of memory (--device {device}).{run_on_cpu} on the CPU (--device cpu)",
              file=sys.stderr)
        return 1


# What an out-of-memory error suggests: the E-step's references grow with classes x rotations x
# Fourier points (README, Known limits), and a checkpoint is written after every iteration.
_LESS_MEMORY = ("Fewer --classes, a lower --max-align-res or a coarser --psi-step or --shift-step need less; "
                "--resume continues a classify or stream job from its last finished iteration")


# What torch's CPU allocator says when an allocation fails (--psi-step 1e-6 asked for 66 GiB at once).
_CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


def _gpu_out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is PyTorch's CUDA out-of-memory error."""
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError)


if __name__ == "__main__":
    sys.exit(main())
