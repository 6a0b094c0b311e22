"""The ``cryo2d`` command line: one sub-command per module in this package."""
from __future__ import annotations

import argparse
import importlib
import sys

from cryo2d.errors import Cryo2DError

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
    parser = argparse.ArgumentParser(
        prog="cryo2d", description="Cryo-EM 2D classification (RELION STAR / CryoSPARC .cs in and out)."
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
        )
        module.add_args(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Cryo2DError as err:
        print(f"cryo2d: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cryo2d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
