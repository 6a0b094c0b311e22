"""Run RELION 3.1 Class2D on a particle STAR file, with a result cache.

The command is what RELION's GUI writes for a CPU "2D classification" job
(plus ``--random_seed`` for reproducibility):

    relion_refine --i STAR --o OUT/run --iter 25 --tau2_fudge 2 --K K
        --particle_diameter D --flatten_solvent --zero_mask --oversampling 1
        --psi_step 12 --offset_range 5 --offset_step 2 --norm --scale --ctf
        --j 2 --pool 30 --pad 2 --dont_combine_weights_via_disc --random_seed 1

Outputs, the wall time and the peak RSS are cached under
``benchmarks/_cache/relion/<key>/`` where ``key`` is the SHA-256 of the STAR
file's bytes, the SHA-256 of every stack it names, and the command line; a
run is repeated only when one of them changes. ``meta.json`` in that folder
holds the command, working folder, wall time, peak RSS and the time at which
each iteration finished; ``relion.log`` holds RELION's output.

RELION takes ~20 min for 3,000 particles of 64 px with K = 20 on 2 cores, so
start long runs in the background and read the cache later::

    $ python benchmarks/relion.py sim/particles.star --K 20 --diameter 180 --background
    $ python benchmarks/relion.py sim/particles.star --K 20 --diameter 180 --status

Background runs queue: a run waits while another cached RELION run is still
going, so the two cores are never shared by two RELION jobs. ``--iter N``
runs only N iterations (a different cache entry) to extrapolate timings.
``--first N`` runs on the first N particles only (a STAR file written next
to the input's folder, naming the same stack): RELION's time per iteration
is linear in the particles, so a subset times a large set in minutes
instead of hours (20,000 x 64 px, K = 20, 3 iterations: 20 times the first
1,000 particles' time is 15 % below the full set's, so the estimate favours
RELION; see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE_ROOT = Path(__file__).resolve().parent / "_cache" / "relion"
OUT_PLACEHOLDER = "{OUT}"
_POLL_S = 2.0

# A child's peak RSS (ru_maxrss) starts from the size of the process it was forked from
# when it execs: a command started straight from a script that has loaded torch and
# scored jobs (about 300 MB) reports at least that. Commands therefore run under this
# small launcher (python -S, about 10 MB), which reports its own child's figures.
_LAUNCHER = """
import json, os, sys
report, nice, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    try:
        if nice:
            os.nice(nice)
        os.execvp(cmd[0], cmd)
    except OSError as err:
        sys.stderr.write(f"{cmd[0]}: {err}\\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as out:
    json.dump({"maxrss_kb": usage.ru_maxrss, "user_s": usage.ru_utime, "cpu_s": usage.ru_utime + usage.ru_stime,
               "nice": nice}, out)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def start_measured(cmd: list[str], report: Path, *, nice: int = 0, **popen_kwargs) -> subprocess.Popen:
    """Start ``cmd`` under the launcher, which writes its peak RSS and CPU time to ``report`` (JSON)
    when it ends (read them with :func:`measured`); ``nice`` is added to its niceness."""
    return subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(report), str(nice), *cmd], **popen_kwargs)


def measured(report: Path) -> dict:
    """The figures :func:`start_measured`'s command left: ``maxrss_kb``, ``user_s``, ``cpu_s``, ``nice``."""
    return json.loads(Path(report).read_text())


def read_star_particles(star: Path):
    """The particle block of a STAR file (pandas DataFrame) and its optics block or None."""
    import starfile

    data = starfile.read(star, always_dict=True)
    particles = optics = None
    for name, block in data.items():
        if "rlnImageName" in block.columns:
            particles = block
        elif name == "optics":
            optics = block
    if particles is None:
        raise SystemExit(f"{star}: no data block with _rlnImageName")
    return particles, optics


def stack_paths(star: Path) -> list[Path]:
    """The image stacks named in a STAR file, resolved against its folder (as RELION does from cwd)."""
    particles, _ = read_star_particles(star)
    names = sorted({str(n).split("@", 1)[1] for n in particles["rlnImageName"]})
    return [star.parent / n for n in names]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def relion_command(
    star: Path,
    *,
    n_classes: int,
    diameter_angst: float,
    iterations: int = 25,
    seed: int = 1,
    threads: int = 2,
    extra: list[str] | None = None,
    out_prefix: str = OUT_PLACEHOLDER + "/run",
) -> list[str]:
    """relion_refine arguments for a CPU Class2D job.

    Parameters
    ----------
    star : Path
        Particle STAR file (RELION 3.1, with optics table).
    n_classes : int
        K.
    diameter_angst : float
        Particle mask diameter (Å).
    iterations : int
        Number of EM iterations (RELION's default for Class2D is 25).
    seed : int
        ``--random_seed`` (RELION skips shuffling the particle order when it is 0).
    threads : int
        ``--j``.
    extra : list of str, optional
        Further arguments appended verbatim.
    out_prefix : str
        ``--o`` value; the placeholder ``{OUT}`` is replaced by the cache folder.

    Returns
    -------
    list of str
    """
    cmd = [
        "relion_refine",
        "--i", str(star.name),
        "--o", out_prefix,
        "--iter", str(iterations),
        "--tau2_fudge", "2",
        "--K", str(n_classes),
        "--particle_diameter", f"{diameter_angst:g}",
        "--flatten_solvent", "--zero_mask",
        "--oversampling", "1",
        "--psi_step", "12",
        "--offset_range", "5",
        "--offset_step", "2",
        "--norm", "--scale", "--ctf",
        "--j", str(threads),
        "--pool", "30",
        "--pad", "2",
        "--dont_combine_weights_via_disc",
        "--random_seed", str(seed),
    ]
    return cmd + list(extra or [])


def cache_key(star: Path, command: list[str]) -> str:
    """SHA-256 of the STAR bytes, each stack's SHA-256 and the command line (with ``{OUT}``)."""
    digest = hashlib.sha256()
    digest.update(star.read_bytes())
    for stack in stack_paths(star):
        digest.update(_file_sha256(stack).encode())
    digest.update(shlex.join(command).encode())
    return digest.hexdigest()[:24]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_meta(cache_dir: Path) -> dict | None:
    """The ``meta.json`` of a cache folder, or None."""
    path = cache_dir / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_meta(cache_dir: Path, meta: dict) -> None:
    tmp = cache_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(cache_dir / "meta.json")


def running_runs(root: Path = CACHE_ROOT, queued_before: float | None = None) -> list[Path]:
    """Cache folders whose RELION run is alive, plus live runners queued before ``queued_before``."""
    out = []
    for meta_path in root.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not _pid_alive(int(meta.get("pid", -1))):
            continue
        if meta.get("status") == "running" or (
            meta.get("status") == "queued"
            and queued_before is not None
            and meta.get("queued_at", float("inf")) < queued_before
        ):
            out.append(meta_path.parent)
    return out


def _iterations_done(cache_dir: Path) -> list[int]:
    its = []
    for p in cache_dir.glob("run_it*_optimiser.star"):
        m = re.search(r"_it(\d+)_optimiser", p.name)
        if m:
            its.append(int(m.group(1)))
    return sorted(its)


def is_done(meta: dict | None) -> bool:
    """Whether a cache entry holds a finished, successful run."""
    return bool(meta) and meta.get("status") == "done" and meta.get("returncode") == 0


def run_relion(
    star: str | Path,
    *,
    nice: int = 10,
    force: bool = False,
    wait_for_others: bool = True,
    verbose: bool = True,
    cache_root: Path = CACHE_ROOT,
    **command_kwargs,
) -> dict:
    """Run (or fetch from the cache) RELION Class2D and return its ``meta.json``.

    Parameters
    ----------
    star : path
        Particle STAR file; RELION runs in its folder so that relative image
        names resolve.
    nice : int
        Niceness added to relion_refine (0 = none).
    force : bool
        Rerun even when the cache holds a finished run.
    wait_for_others : bool
        Wait while another cached RELION run is going (or queued earlier).
    verbose : bool
        Print the command and one line per finished iteration.
    cache_root : Path
        Folder of the cache entries.
    **command_kwargs
        :func:`relion_command`'s keyword arguments (``n_classes``,
        ``diameter_angst``, ``iterations``, ``seed``, ``threads``, ``extra``).

    Returns
    -------
    dict
        ``cache_dir``, ``command`` (shell string), ``cwd``, ``wall_s``,
        ``peak_rss_mb`` (of relion_refine, from ``wait4`` in :func:`start_measured`'s
        launcher), ``nice``, ``cpu_s`` (its
        user + system CPU time), ``loadavg_start``/``loadavg_end``,
        ``iteration_times_s`` (seconds since start at which each iteration's
        files appeared), ``returncode`` and ``status`` ("done" or "failed").
    """
    star = Path(star).resolve()
    template = relion_command(star, **command_kwargs)
    iterations = int(template[template.index("--iter") + 1])
    n_classes = int(template[template.index("--K") + 1])
    key = cache_key(star, template)
    cache_dir = cache_root / key
    meta = read_meta(cache_dir)
    if is_done(meta) and not force:
        if verbose:
            print(f"relion: cached {cache_dir} ({meta['wall_s']:.0f} s)", flush=True)
        return meta
    if meta and meta.get("status") in ("running", "queued") and _pid_alive(int(meta["pid"])):
        raise RuntimeError(f"{cache_dir}: a run is already in progress (pid {meta['pid']})")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob("run_*"):
        old.unlink()
    command = [a.replace(OUT_PLACEHOLDER, str(cache_dir)) for a in template]
    meta = {
        "key": key,
        "cache_dir": str(cache_dir),
        "star": str(star),
        "stacks": [str(p) for p in stack_paths(star)],
        "command": shlex.join(command),
        "cwd": str(star.parent),
        "iterations": iterations,
        "n_classes": n_classes,
        "status": "queued",
        "queued_at": time.time(),
        "pid": os.getpid(),
        "cpu_count": os.cpu_count(),
    }
    _write_meta(cache_dir, meta)
    while wait_for_others:
        others = [d for d in running_runs(cache_root, meta["queued_at"]) if d != cache_dir]
        if not others:
            break
        if verbose:
            print(f"relion: waiting for {others[0].name} to finish", flush=True)
        time.sleep(30)

    log = open(cache_dir / "relion.log", "w")
    start = time.time()
    report = cache_dir / "rusage.json"
    report.unlink(missing_ok=True)
    proc = start_measured(command, report, nice=nice, cwd=star.parent, stdout=log, stderr=subprocess.STDOUT)
    meta.update(
        status="running", pid=proc.pid, started=time.strftime("%Y-%m-%d %H:%M:%S"), loadavg_start=os.getloadavg()
    )
    _write_meta(cache_dir, meta)
    if verbose:
        print(f"relion: {meta['command']}\nrelion: cwd {star.parent}\nrelion: log {cache_dir / 'relion.log'}", flush=True)

    times: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for it in _iterations_done(cache_dir):
                if it not in times:
                    times[it] = time.time() - start
                    if verbose:
                        rate = times[it] / it if it else float("nan")
                        print(f"relion: iteration {it}/{iterations}  {times[it]:7.0f} s  ({rate:.0f} s/iter)", flush=True)
            stop.wait(_POLL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.time() - start
    usage = measured(report)
    stop.set()
    watcher.join()
    log.close()
    for it in _iterations_done(cache_dir):
        if it not in times:
            times[it] = wall
            if verbose:
                print(f"relion: iteration {it}/{iterations}  {wall:7.0f} s", flush=True)
    returncode = os.waitstatus_to_exitcode(status)
    meta.update(
        status="done" if returncode == 0 else "failed",
        returncode=returncode,
        wall_s=wall,
        peak_rss_mb=usage["maxrss_kb"] / 1024.0,
        user_cpu_s=usage["user_s"],
        cpu_s=usage["cpu_s"],
        nice=nice,
        loadavg_end=os.getloadavg(),
        iteration_times_s={str(k): round(v, 1) for k, v in sorted(times.items())},
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    _write_meta(cache_dir, meta)
    if verbose:
        print(f"relion: {meta['status']} in {wall:.0f} s, peak RSS {meta['peak_rss_mb']:.0f} MB", flush=True)
    return meta


def cache_dir_for(star: str | Path, cache_root: Path = CACHE_ROOT, **kwargs) -> Path:
    """The cache folder :func:`run_relion` would use for these arguments."""
    star = Path(star).resolve()
    return cache_root / cache_key(star, relion_command(star, **kwargs))


def subset_star(star: Path, n: int) -> Path:
    """Write the first ``n`` particles of ``star`` to ``<its folder>-first<n>/particles.star``; return that path.

    The image names point at the input's stacks (relative to the new
    folder), so no image is copied. The same subset always gives the same
    bytes, so the RELION cache key stays the same between runs.
    """
    import starfile

    data = starfile.read(star, always_dict=True)
    out_dir = star.parent.with_name(f"{star.parent.name}-first{n}")
    for name, block in data.items():
        if "rlnImageName" in block.columns:
            if len(block) < n:
                raise SystemExit(f"{star}: {len(block)} particles, fewer than --first {n}")
            block = block.iloc[:n].copy()
            block["rlnImageName"] = [
                f"{i}@{os.path.relpath(star.parent / s, out_dir)}"
                for i, s in (str(v).split("@", 1) for v in block["rlnImageName"])
            ]
            data[name] = block
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "particles.star"
    tmp = out_dir / "particles.star.tmp"
    starfile.write(data, tmp, overwrite=True)
    # Without starfile's time-stamped header, the same subset gives the same bytes (and cache key).
    body = "".join(line for line in tmp.read_text().splitlines(keepends=True) if not line.startswith("# Created"))
    if out.exists() and out.read_text() == body:
        tmp.unlink()
    else:
        tmp.write_text(body)
        os.replace(tmp, out)
    return out


def default_diameter_angst(star: Path) -> float:
    """0.8 × box × pixel size, from the STAR optics table (Å)."""
    _, optics = read_star_particles(star)
    if optics is None or "rlnImageSize" not in optics or "rlnImagePixelSize" not in optics:
        raise SystemExit(f"{star}: no optics table with image size and pixel size; give --diameter")
    return 0.8 * float(optics["rlnImageSize"].iloc[0]) * float(optics["rlnImagePixelSize"].iloc[0])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("star", type=Path, help="particle STAR file (RELION 3.1)")
    p.add_argument("--K", type=int, required=True, help="number of classes")
    p.add_argument("--diameter", type=float, help="particle diameter in Å (default 0.8 × box × pixel size)")
    p.add_argument("--iter", type=int, default=25, help="EM iterations (fewer for timing extrapolation)")
    p.add_argument("--seed", type=int, default=1, help="--random_seed (0 makes RELION skip shuffling)")
    p.add_argument("--j", type=int, default=2, help="threads")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--extra", default="", help="further relion_refine arguments (one string)")
    p.add_argument("--force", action="store_true", help="rerun even when cached")
    p.add_argument("--background", action="store_true", help="detach; progress goes to the cache folder's runner.log")
    p.add_argument("--status", action="store_true", help="print the cache entry's meta.json and exit")
    p.add_argument("--first", type=int, help="run on the first N particles only (timing extrapolation in N)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    star = args.star.resolve()
    if args.first:
        star = subset_star(star, args.first)
    diameter = args.diameter or default_diameter_angst(star)
    kwargs = dict(
        n_classes=args.K,
        diameter_angst=diameter,
        iterations=args.iter,
        seed=args.seed,
        threads=args.j,
        extra=shlex.split(args.extra),
    )
    cache_dir = cache_dir_for(star, **kwargs)
    if args.status:
        meta = read_meta(cache_dir)
        print(json.dumps(meta, indent=2) if meta else f"no run cached in {cache_dir}")
        if meta and meta.get("status") == "running":
            print(f"iterations done: {_iterations_done(cache_dir)}")
        return 0
    if args.background:
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--background"]
        runner_log = open(cache_dir / "runner.log", "a")
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *argv_child],
            stdout=runner_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        print(f"relion: started in the background (pid {child.pid}); progress: {cache_dir / 'runner.log'}")
        return 0
    meta = run_relion(star, nice=args.nice, force=args.force, **kwargs)
    return 0 if is_done(meta) else 1


if __name__ == "__main__":
    sys.exit(main())
