"""``cryo2d view``: a local web page to look at a job's classes and select them.

A small ``http.server.ThreadingHTTPServer`` (standard library only) that
serves, for one job folder:

- ``GET /``: the page (``templates/view.html`` with ``static/view.js`` and
  ``static/view.css``, shipped as package data);
- ``GET /api/classes``: JSON with one entry per class (1-based ``number``,
  ``count``, ``fraction``, ``resolution`` in Å, ``junk`` score and ``auto``:
  kept by the automatic selection);
- ``GET /class/<k>.png``: class average k (1-based) as an 8-bit PNG tile;
- ``GET /files/<name>``: a file of the job folder itself (e.g.
  ``classes.star``, ``gallery.png``); names with ``..``, absolute paths or
  anything outside the folder give 404;
- ``POST /api/save`` with JSON ``{"classes": [1, 4, 7]}``: writes the
  selection with ``cryo2d.select.write_selection`` (exactly what
  ``cryo2d select --classes`` writes) into the output folder (default
  ``JOB/selected``) and answers with its one-line summary.

Everything else is 404. The job's own files are only read; the only writes
are the selection's. The server binds 127.0.0.1 unless another host is given,
answers only requests whose ``Host`` header names a loopback address, the
bound address or the host name it was given (a guard against DNS rebinding),
and accepts saves only as
``application/json`` (a cross-site form cannot send that without a CORS
preflight, which this server never grants).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

import numpy as np

from cryo2d.errors import Cryo2DError
from cryo2d.gallery.render import _tile
from cryo2d.junk import junk_scores
from cryo2d.select import Job, SelectionCriteria, passes, read_job, write_selection

__all__ = ["ViewServer", "make_server"]

_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_FILE_TYPES = {
    ".png": "image/png", ".json": "application/json", ".jsonl": "application/x-ndjson",
    ".star": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".csv": "text/plain; charset=utf-8",
}
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_TILE_PX = 160
_MAX_BODY = 1 << 20


def _bare(host: str) -> str:
    """``host`` lowercased, without surrounding space and IPv6 brackets."""
    host = str(host).strip().lower()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _package_text(folder: str, name: str) -> str:
    return (resources.files("cryo2d.gallery") / folder / name).read_text(encoding="utf-8")


def _static_names() -> set[str]:
    root = resources.files("cryo2d.gallery") / "static"
    return {entry.name for entry in root.iterdir() if Path(entry.name).suffix in _STATIC_TYPES}


class ViewServer(ThreadingHTTPServer):
    """The gallery server of one job (see the module docstring for the routes).

    Attributes
    ----------
    job : Job
        The job, read once at start.
    out_dir : Path
        Where Save writes the selection.
    on_request : callable or None
        Called with one line per request (the CLI's ``--verbose``); None = quiet.
    host_name : str
        The host as given (lowercased, without IPv6 brackets), e.g. ``localhost`` or a
        host name; the ``Host`` header may name it as well as the bound address.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], job: Job, out_dir: Path,
                 on_request: Callable[[str], None] | None = None) -> None:
        self.job = job
        self.out_dir = out_dir
        self.on_request = on_request
        self.host_name = _bare(address[0])
        self._tiles: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._static = _static_names()
        counts = job.counts
        self._junk = junk_scores(job.unmasked, counts)
        self._auto = passes(job, SelectionCriteria.auto())
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page, with the host as given (or the bound address when none was)."""
        bound, port = self.server_address[:2]
        host = self.host_name or str(bound)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def classes_json(self) -> dict:
        """The ``/api/classes`` document."""
        job = self.job
        counts = job.counts
        total = max(int(counts.sum()), 1)
        res = job.resolution_angst
        return {
            "job": str(job.folder),
            "out": str(self.out_dir),
            "n_particles": int(len(job.class_number)),
            "pixel_size": job.pixel_size_angst,
            "classes": [
                {
                    "number": k + 1,
                    "count": int(counts[k]),
                    "fraction": counts[k] / total,
                    "resolution": float(res[k]) if np.isfinite(res[k]) else None,
                    "junk": round(float(self._junk[k]), 3),
                    "auto": bool(self._auto[k]),
                }
                for k in range(job.n_classes)
            ],
        }

    def tile(self, number: int) -> bytes:
        """PNG bytes of class ``number`` (1-based), rendered once and cached."""
        with self._lock:
            if number not in self._tiles:
                buffer = io.BytesIO()
                _tile(np.asarray(self.job.averages[number - 1], dtype=np.float64), _TILE_PX).save(buffer, format="PNG")
                self._tiles[number] = buffer.getvalue()
            return self._tiles[number]

    def job_file(self, name: str) -> Path | None:
        """The job-folder file ``name`` names, or None when it is not one (traversal, absolute, missing)."""
        if not name or "\x00" in name or "\\" in name or name.startswith("/") or os.path.isabs(name):
            return None
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            return None
        root = self.job.folder.resolve()
        path = (root / posixpath.join(*parts)).resolve()
        if path == root or root not in path.parents or not path.is_file():
            return None
        return path

    def save(self, classes: list[int]) -> dict:
        """Write the selection (``write_selection``); returns the ``/api/save`` answer."""
        with self._save_lock:
            result = write_selection(self.job, classes, self.out_dir)
        return {
            "summary": result.summary(),
            "classes": [int(c) for c in result.classes],
            "n_kept": result.n_kept,
            "n_rejected": result.n_rejected,
            "paths": {k: str(v) for k, v in result.paths.items()},
        }


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer
    server_version = "cryo2d-view"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        if self.server.on_request is not None:
            self.server.on_request(f"{self.address_string()} {format % args}")

    # -- helpers -------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: dict, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _not_found(self) -> None:
        self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1: host.find("]")] if "]" in host else ""
        else:
            name = host.rsplit(":", 1)[0] if ":" in host else host
        bound = _bare(self.server.server_address[0])
        if not name:
            return False
        return name in _LOOPBACK or name in (bound, self.server.host_name) or bound in ("0.0.0.0", "::")

    # -- routes --------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._send(HTTPStatus.FORBIDDEN, b"forbidden host\n", "text/plain; charset=utf-8")
        raw = urlsplit(self.path).path
        path = unquote(raw)
        if ".." in raw or ".." in path or "//" in path or "\\" in path:
            return self._not_found()
        if path in ("/", "/index.html"):
            return self._send(200, _package_text("templates", "view.html").encode("utf-8"), "text/html; charset=utf-8")
        if path == "/api/classes":
            return self._json(self.server.classes_json())
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name in self.server._static:
                return self._send(200, _package_text("static", name).encode("utf-8"), _STATIC_TYPES[Path(name).suffix])
            return self._not_found()
        if path.startswith("/class/") and path.endswith(".png"):
            number = path[len("/class/"):-len(".png")]
            if number.isdigit() and 1 <= int(number) <= self.server.job.n_classes:
                return self._send(200, self.server.tile(int(number)), "image/png")
            return self._not_found()
        if path.startswith("/files/"):
            found = self.server.job_file(path[len("/files/"):])
            if found is None:
                return self._not_found()
            return self._send(200, found.read_bytes(), _FILE_TYPES.get(found.suffix.lower(), "application/octet-stream"))
        return self._not_found()

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._send(HTTPStatus.FORBIDDEN, b"forbidden host\n", "text/plain; charset=utf-8")
        if urlsplit(self.path).path != "/api/save":
            return self._not_found()
        if not (self.headers.get("Content-Type") or "").lower().startswith("application/json"):
            return self._json({"error": "send the selection as application/json"}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= _MAX_BODY:
            return self._json({"error": "bad request body"}, HTTPStatus.BAD_REQUEST)
        try:
            body = json.loads(self.rfile.read(length))
            classes = body["classes"]
            if not isinstance(classes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._json({"error": 'expected {"classes": [1, 4, 7]}'}, HTTPStatus.BAD_REQUEST)
        n_classes = self.server.job.n_classes
        bad = next((c for c in classes if not 1 <= c <= n_classes), None)
        if bad is not None:  # checked here: numbers past int64 would end write_selection in OverflowError
            shown = str(bad)
            shown = shown if len(shown) <= 24 else f"{shown[:20]}... ({len(shown)} digits)"
            return self._json({"error": f"class {shown} does not exist (the job has classes 1-{n_classes})"},
                              HTTPStatus.BAD_REQUEST)
        try:
            return self._json(self.server.save(classes))
        except (Cryo2DError, ValueError, OverflowError) as err:
            return self._json({"error": str(err) or type(err).__name__}, HTTPStatus.BAD_REQUEST)


def make_server(
    job_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    out_dir: str | os.PathLike | None = None,
    on_request: Callable[[str], None] | None = None,
) -> ViewServer:
    """Read a job and bind its gallery server (not yet serving: call ``serve_forever``).

    Parameters
    ----------
    job_dir : str or PathLike
        Classification job folder.
    host : str
        Address to listen on; 127.0.0.1 (this machine only) by default.
    port : int
        TCP port; 0 picks a free one (see ``ViewServer.url``).
    out_dir : str or PathLike, optional
        Where Save writes the selection (default ``JOB/selected``).
    on_request : callable, optional
        Receives one log line per request.

    Returns
    -------
    ViewServer

    Raises
    ------
    Cryo2DError
        A bad job folder (see ``read_job``), or the address cannot be bound.
    """
    if not 0 <= int(port) <= 65535:
        raise Cryo2DError(f"--port must be in 0-65535, got {port}")
    job = read_job(job_dir)
    out = Path(out_dir) if out_dir is not None else job.folder / "selected"
    try:
        return ViewServer((host, int(port)), job, out, on_request)
    except OSError as err:
        raise Cryo2DError(f"{job.folder}: cannot listen on {host}:{port} ({err.strerror or err}; try another --port)") from err
