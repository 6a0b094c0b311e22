"""Browse a job's class averages in a web browser and select classes by clicking.

Starts a small web server for JOB and prints its address; open it in a
browser. Every class is shown with its particle count, resolution and junk
score, sortable; click classes to select them and press Save: the selection
is written exactly as `cryo2d select --classes ...` writes it (particles.star
or .cs, rejected.star or .cs, templates.mrcs, classes.star) into --out (default
JOB/selected). The job's own files are never changed. The server listens on
127.0.0.1 (this machine only) unless --host says otherwise; from another
machine use an SSH tunnel (ssh -L 8000:127.0.0.1:8000 host). Stop it with
Ctrl-C.

examples:
  $ cryo2d view Class2D/run1
  $ cryo2d view Class2D/run1 --port 8123 --out Select/by_eye
"""
from __future__ import annotations

import argparse
import sys

from cryo2d.cli.classify import out_arg
from cryo2d.gallery.server import make_server


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="classification job folder")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address or host name to listen on (default %(default)s: this machine only)")
    parser.add_argument("-o", "--out", type=out_arg, default=None, help="folder Save writes to (default JOB/selected)")
    parser.add_argument("--verbose", action="store_true", help="print one line per request")


def run(args: argparse.Namespace) -> int:
    log = (lambda line: print(line, file=sys.stderr)) if args.verbose else None
    server = make_server(args.job, host=args.host, port=args.port, out_dir=args.out, on_request=log)
    print(f"cryo2d view: {server.url}  (Save writes to {server.out_dir}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
