"""Classification quality of cryo2d vs RELION 3.1 Class2D on simulated data.

Simulates a data set with ground truth (``cryo2d simulate``), classifies it
with ``cryo2d classify`` and with RELION (cached, see ``relion.py``), scores
both with :func:`cryo2d.evaluate.score_job`, prints a table and writes it,
with the exact commands, into ``benchmarks/README.md`` under
"## Quality vs RELION".

Presets:

- default ("hard"): 5,000 particles, 64 px, SNR 0.05, 10% junk, views
  uniform over the sphere plus a rare view at 3%, K = 20;
- ``--small``: 1,500 particles, 48 px, SNR 0.1, 8 discrete views, one at 3%,
  K = 12;
- ``--preset peer``: the hard preset at 3,000 particles, the size of the
  speed issue's side-by-side run (RELION 3.1 took 20 minutes on it);
- ``--preset lowsnr``: 3,000 particles, 80 px, SNR 0.02, 15% junk, 12
  discrete views, one at 3%, K = 20 (with the ribosome map: the lowest SNR
  measured side by side, where neither program finds the views);
- ``--preset highsnr``: 2,000 particles, 64 px, SNR 0.3, 10% junk, 10
  discrete views, one at 3%, K = 16 (with haemoglobin at 1.6 Å per pixel:
  easy to classify, and class averages sharper than the default 6 Å).

    $ python benchmarks/quality.py --small
    $ python benchmarks/quality.py --preset peer
    $ python benchmarks/quality.py                      # ~35 min of RELION the first time
    $ python benchmarks/quality.py --relion-background  # start RELION, score what is ready
    $ python benchmarks/quality.py --preset peer --relion-force  # RELION rerun now, beside cryo2d
    $ python benchmarks/quality.py --preset peer --runs 3  # three seeds of each tool, and their means
    $ python benchmarks/quality.py --small --map ../shared/data/maps/emd_3488.mrc --sim-args '--pixel-size 2.5'

``--map`` simulates from another molecule (its own cache entries and README
subsection): the held-out check of the engine issue.

RELION's results are cached by input and command, so only the first run of a
preset waits for it. A speed ratio needs both programs run on the host as it
is at the time (the 2-core host's speed drifts within a day, and not alike for
both): ``--relion-force`` reruns RELION, and the notes say when each ran.

One run of either program scores as its seed falls: on the `peer` set RELION's
median NCC was 0.936, 0.833 and 0.895 from ``--random_seed`` 1, 2 and 3
(benchmarks/README.md, session 53). ``--runs N`` runs each tool N times on the
same simulation (cryo2d's EM seeds and RELION's seeds differ; each RELION run
has its own cache entry) and adds a row of each tool's means.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relion  # noqa: E402  (benchmarks/relion.py)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / "_cache"
README = BENCH_DIR / "README.md"
SECTION = "## Quality vs RELION"

PRESETS = {
    # uniform: view id = nearest of n_views bin directions, plus the rare view (id n_views)
    "hard": dict(n=5000, box=64, snr=0.05, junk_fraction=0.1, classes=20, views="uniform", n_views=20,
                 rare_fraction=0.03),
    # discrete: n_views directions, the last one rare
    "small": dict(n=1500, box=48, snr=0.1, junk_fraction=0.1, classes=12, views="discrete", n_views=8,
                  rare_fraction=0.03),
}
PRESETS["peer"] = dict(PRESETS["hard"], n=3000)  # the speed issue's side-by-side size
# low SNR: where the search cannot find the views from random starting classes
PRESETS["lowsnr"] = dict(n=3000, box=80, snr=0.02, junk_fraction=0.15, classes=20, views="discrete", n_views=12,
                         rare_fraction=0.03)
# high SNR: the classes are easy; how sharp the averages are decides their NCC
PRESETS["highsnr"] = dict(n=2000, box=64, snr=0.3, junk_fraction=0.1, classes=16, views="discrete", n_views=10,
                          rare_fraction=0.03)


def cryo2d_exe() -> list[str]:
    """How to call the cryo2d CLI from this interpreter."""
    return [sys.executable, "-m", "cryo2d"]


def simulate_command(p: dict, out: Path, seed: int, extra: list[str], map_path: str = "bundled") -> list[str]:
    """``cryo2d simulate`` arguments for a preset (``map_path``: an MRC map, or the bundled one)."""
    return [
        "cryo2d", "simulate", map_path, "-o", str(out),
        "-n", str(p["n"]), "--box", str(p["box"]), "--snr", f"{p['snr']:g}",
        "--junk-fraction", f"{p['junk_fraction']:g}", "--views", p["views"],
        "--n-views", str(p["n_views"]), "--rare-fraction", f"{p['rare_fraction']:g}",
        "--seed", str(seed), *extra,
    ]


def timed_run(cmd: list[str], log_path: Path, cwd: Path | None = None) -> tuple[int, float, float, float]:
    """Run a command; return (exit code, wall s, peak RSS MB, user + system CPU s of the child).

    The command runs under :func:`relion.start_measured`'s launcher, so its peak RSS is its own,
    not this script's size at the fork.
    """
    report = log_path.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        start = time.time()
        proc = relion.start_measured(cmd, report, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, _ = os.wait4(proc.pid, 0)
    wall = time.time() - start
    usage = relion.measured(report)
    return os.waitstatus_to_exitcode(status), wall, usage["maxrss_kb"] / 1024.0, usage["cpu_s"]


def _shell(cmd: list[str]) -> str:
    exe = cryo2d_exe()
    if cmd[: len(exe)] == exe:
        cmd = ["cryo2d", *cmd[len(exe):]]
    return shlex.join(cmd)


def simulate(p: dict, sim_dir: Path, seed: int, extra: list[str], map_path: str = "bundled") -> str:
    """Simulate into ``sim_dir`` unless it is already there; return the command."""
    cmd = simulate_command(p, sim_dir, seed, extra, map_path)
    done = sim_dir / "particles.star"
    if done.exists() and (sim_dir / "truth.json").exists() and (sim_dir / "views.mrcs").exists():
        print(f"simulate: cached {sim_dir}", flush=True)
        return shlex.join(cmd)
    sim_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"simulate: {shlex.join(cmd)}", flush=True)
    # In a child process: a forked child's peak RSS (ru_maxrss) starts from its
    # parent's, so simulating in this process would inflate every later figure.
    if subprocess.run([*cryo2d_exe(), *cmd[1:]]).returncode != 0:
        raise SystemExit("cryo2d simulate failed")
    return shlex.join(cmd)


def particle_diameter_angst(sim_dir: Path) -> float:
    """RELION mask diameter (Å): 1.1 × the simulator's particle diameter, at most 0.95 × the box."""
    meta = json.loads((sim_dir / "truth.json").read_text())
    psize = float(meta["pixel_size_angst"])
    box = int(relion.read_star_particles(sim_dir / "particles.star")[1]["rlnImageSize"].iloc[0])
    diameter = float(meta.get("particle_diameter_angst") or 0.8 * box * psize)
    return round(min(1.1 * diameter, 0.95 * box * psize), 1)


def view_baseline_ncc(sim_dir: Path, n_views: int = 6) -> float:
    """Median best NCC between clean projections of different views (the floor of median NCC)."""
    import mrcfile
    import numpy as np

    from cryo2d.evaluate import best_ncc

    views = np.asarray(mrcfile.read(sim_dir / "views.mrcs"), dtype=np.float64)[:n_views]
    pairs = [best_ncc(views[i], views[j], psi_step_deg=5) for i in range(len(views)) for j in range(len(views)) if i != j]
    return float(np.median(pairs)) if pairs else float("nan")


def run_cryo2d(star: Path, job: Path, classes: int, seed: int, extra: list[str]) -> dict:
    """Run ``cryo2d classify``; return command, wall time, peak RSS, exit code."""
    cmd = [*cryo2d_exe(), "classify", str(star), "-o", str(job), "--classes", str(classes), "--seed", str(seed), *extra]
    job.mkdir(parents=True, exist_ok=True)
    print(f"cryo2d: {_shell(cmd)}", flush=True)
    code, wall, rss, cpu = timed_run(cmd, job.parent / f"{job.name}.log")
    print(f"cryo2d: exit {code} in {wall:.0f} s, peak RSS {rss:.0f} MB (log {job.parent / (job.name + '.log')})", flush=True)
    return {"command": _shell(cmd), "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "returncode": code}


def classify_available() -> bool:
    """Whether ``cryo2d classify`` exists in this checkout."""
    run = subprocess.run([*cryo2d_exe(), "classify", "--help"], capture_output=True, text=True)
    return run.returncode == 0


COLUMNS = [
    ("tool", "{}"),
    ("wall s", "{:.0f}"),
    ("CPU s", "{:.0f}"),
    ("peak RSS MB", "{:.0f}"),
    ("junk F1", "{:.3f}"),
    ("purity", "{:.3f}"),
    ("rare view kept", "{}"),
    ("median NCC", "{:.3f}"),
    ("#particle classes", "{}"),
    ("#junk classes", "{}"),
    ("#empty", "{}"),
]


def _cpu_s(timing: dict) -> float | None:
    """CPU seconds of a run: ``cpu_s``, or a RELION cache entry's ``user_cpu_s`` where it has only that."""
    return timing.get("cpu_s", timing.get("user_cpu_s"))


def table_row(tool: str, timing: dict, s: dict) -> list[str]:
    values = [
        tool, timing.get("wall_s"), _cpu_s(timing), timing.get("peak_rss_mb"),
        s["junk_f1"], s["purity"], {True: "yes", False: "no", None: "n/a"}[s["rare_view_recovered"]], s["median_ncc"], s["n_particle_classes"],
        s["n_junk_classes"], s["n_empty_classes"],
    ]
    return [fmt.format(v) if v is not None else "–" for (_, fmt), v in zip(COLUMNS, values)]


def mean_row(tool: str, runs: list[tuple[str, dict, dict]]) -> list[str]:
    """A table row of the means of several runs' times and scores; the rare view as "kept in k of n"."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    timing = {"wall_s": mean([t.get("wall_s") for _, t, _ in runs]), "cpu_s": mean([_cpu_s(t) for _, t, _ in runs]),
              "peak_rss_mb": mean([t.get("peak_rss_mb") for _, t, _ in runs])}
    scores = {key: mean([s[key] for _, _, s in runs])
              for key in ("junk_f1", "purity", "median_ncc", "n_particle_classes", "n_junk_classes", "n_empty_classes")}
    row = table_row(tool, timing, {**scores, "rare_view_recovered": None})
    names = [c for c, _ in COLUMNS]
    kept = [s["rare_view_recovered"] for _, _, s in runs]
    if all(k is not None for k in kept):
        row[names.index("rare view kept")] = f"{sum(kept)} of {len(kept)}"
    for col in ("#particle classes", "#junk classes", "#empty"):
        row[names.index(col)] = f"{float(row[names.index(col)]):.1f}"
    return row


def markdown_table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(r) + " |" for r in rows)])


def update_readme(block: str, readme: Path = README) -> None:
    """Replace (or append) the "## Quality vs RELION" section of the README."""
    text = readme.read_text() if readme.exists() else "# cryo2d benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip() + "\n\n" + block.rstrip() + "\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        tail = text[nxt:] if nxt >= 0 else "\n"
        text = text[:start] + block.rstrip() + "\n" + tail
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(readme)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="1,500 particles, 48 px, SNR 0.1, 8 views, K = 12")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a preset by name (default hard; --small = small)")
    p.add_argument("-n", type=int, help="number of particles")
    p.add_argument("--box", type=int, help="box (px)")
    p.add_argument("--snr", type=float)
    p.add_argument("--junk-fraction", type=float)
    p.add_argument("--classes", "-K", type=int)
    p.add_argument("--n-views", type=int, help="discrete views / uniform bins")
    p.add_argument("--seed", type=int, default=0, help="simulation and cryo2d seed (RELION gets seed + 1)")
    p.add_argument("--runs", type=int, default=1,
                   help="runs of each tool on the one simulation: cryo2d with EM seeds seed ... seed + runs - 1, "
                        "RELION with --random_seed seed + 1 ... seed + runs; a row each and a row of their means "
                        "(single runs of either depend on its seed: benchmarks/README.md, session 53)")
    p.add_argument("--map", default="bundled", help="3D map to simulate from (default: the bundled EMD-1832)")
    p.add_argument("--sim-args", default="", help="extra cryo2d simulate arguments (one string), e.g. '--pixel-size 2.5'")
    p.add_argument("--classify-args", default="", help="extra cryo2d classify arguments (one string)")
    p.add_argument("--relion-iter", type=int, default=25)
    p.add_argument("--same-mask", action="store_true",
                   help="also run cryo2d with --mask-diameter set to RELION's particle diameter (a second row)")
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--skip-cryo2d", action="store_true")
    p.add_argument("--relion-background", action="store_true",
                   help="start RELION in the background when not cached; score it only once done")
    p.add_argument("--relion-force", action="store_true",
                   help="rerun RELION even when cached, after cryo2d: the host's speed drifts within a day, so a "
                        "ratio needs both runs on the host as it is now (benchmarks/README.md, session 23)")
    p.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    return p


def main(argv: list[str] | None = None) -> int:
    from cryo2d.evaluate import score_job

    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()  # RELION runs queued since then ran in this run, the others came from the cache
    if args.relion_force and args.relion_background:
        parser.error("--relion-force runs RELION in the foreground; drop --relion-background")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    name = args.preset or ("small" if args.small else "hard")
    p = dict(PRESETS[name])
    for key, value in (("n", args.n), ("box", args.box), ("snr", args.snr),
                       ("junk_fraction", args.junk_fraction), ("classes", args.classes),
                       ("n_views", args.n_views)):
        if value is not None:
            p[key] = value
    if args.map != "bundled":  # another molecule: its own cache entries and README subsection
        name = f"{name}, {Path(args.map).name.split('.')[0]}"
    tag = (f"{name.replace(', ', '-')}-n{p['n']}-b{p['box']}-snr{p['snr']:g}-j{p['junk_fraction']:g}-v{p['n_views']}"
           f"-s{args.seed}")
    if args.sim_args:
        tag += "-x" + hashlib.sha256(args.sim_args.encode()).hexdigest()[:8]
    sim_dir = CACHE / "sim" / tag
    sim_cmd = simulate(p, sim_dir, args.seed, shlex.split(args.sim_args), args.map)
    star = sim_dir / "particles.star"
    rows, notes, commands = [], [], {"simulate": sim_cmd}
    groups: dict[str, list[int]] = {}  # a tool's rows (one per seed), for the row of their means

    if not args.skip_cryo2d:
        if classify_available():
            notes.append(f"cryo2d ran from {time.strftime('%Y-%m-%d %H:%M:%S')}.")
            if relion.running_runs():
                notes.append("a RELION run was going on while cryo2d ran: cryo2d's wall time is contended.")
            job = CACHE / "cryo2d" / f"{tag}-K{p['classes']}"
            tool = "cryo2d"
            if args.classify_args:  # its own folder and row, not the defaults' (which it would overwrite)
                job = job.parent / f"{job.name}-c{hashlib.sha256(args.classify_args.encode()).hexdigest()[:8]}"
                tool = f"cryo2d {args.classify_args}"
            runs = [(tool, job, shlex.split(args.classify_args))]
            if args.same_mask:  # the mask diameter RELION is given, as a user would type it into both
                d = particle_diameter_angst(sim_dir)
                runs.append((f"{tool} --mask-diameter {d:g}", job.parent / f"{job.name}-m{d:g}",
                             [*shlex.split(args.classify_args), "--mask-diameter", f"{d:g}"]))
            for label, job_dir, extra in runs:
                for em_seed in range(args.seed, args.seed + args.runs):
                    run_label = label if args.runs == 1 else f"{label} (EM seed {em_seed})"
                    run_dir = job_dir if em_seed == args.seed else job_dir.parent / f"{job_dir.name}-e{em_seed}"
                    timing = run_cryo2d(star, run_dir, p["classes"], em_seed, extra)
                    commands[run_label] = timing["command"]
                    if timing["returncode"] == 0:
                        rows.append((run_label, timing, score_job(run_dir, sim_dir)))
                        groups.setdefault(label, []).append(len(rows) - 1)
                    else:
                        notes.append(f"{run_label} failed (exit {timing['returncode']}); see {run_dir}.log")
        else:
            notes.append("`cryo2d classify` is not available in this checkout yet; only RELION was scored.")

    if not args.skip_relion:
        label = f"RELION 3.1 ({args.relion_iter} it)"
        diameter = particle_diameter_angst(sim_dir)  # reads the STAR file: once, not once per seed
        for relion_seed in range(args.seed + 1, args.seed + 1 + args.runs):
            run_label = label if args.runs == 1 else f"{label}, seed {relion_seed}"
            said = "" if args.runs == 1 else f"{run_label}: "
            kwargs = dict(
                n_classes=p["classes"],
                diameter_angst=diameter,
                iterations=args.relion_iter,
                seed=relion_seed,
                threads=2,
            )
            cache_dir = relion.cache_dir_for(star, **kwargs)
            meta = relion.read_meta(cache_dir)
            if not relion.is_done(meta) and args.relion_background:
                if not (meta and meta.get("status") in ("running", "queued") and relion._pid_alive(int(meta["pid"]))):
                    cli = [str(star), "--K", str(kwargs["n_classes"]), "--diameter", str(kwargs["diameter_angst"]),
                           "--iter", str(kwargs["iterations"]), "--seed", str(kwargs["seed"]), "--background"]
                    relion.main(cli)
                notes.append(f"{said}RELION is running in the background ({cache_dir}); rerun this script when it is done.")
            else:
                # At cryo2d's priority: a niced RELION would lose wall time to any other load.
                meta = relion.run_relion(star, force=args.relion_force, nice=0, **kwargs)
            if relion.is_done(meta):
                if meta.get("started"):
                    fresh = args.relion_force or meta.get("queued_at", 0) >= started
                    notes.append(f"{said}RELION ran from {meta['started']} ({'in this run' if fresh else 'cached'}).")
                if "loadavg_start" in meta:
                    notes.append(f"{said}load average (1 min) at RELION's start / end: {meta['loadavg_start'][0]:.1f} / "
                                 f"{meta['loadavg_end'][0]:.1f} on {os.cpu_count()} cores (wall times are contended "
                                 "when it exceeds the cores; CPU s is not).")
                commands[run_label.replace("RELION 3.1 ", "relion ") if args.runs > 1 else "relion"] = (
                    f"(cd {meta['cwd']} && {meta['command']})")
                rows.append((run_label, meta, score_job(cache_dir, sim_dir)))
                groups.setdefault(label, []).append(len(rows) - 1)
            elif meta and meta.get("status") == "failed":
                notes.append(f"{said}RELION failed (exit {meta.get('returncode')}); see {cache_dir / 'relion.log'}")

    if rows:
        notes.append(f"median NCC between clean projections of *different* views of this map: "
                     f"{view_baseline_ncc(sim_dir):.3f} (a class average of the wrong view scores about this).")
    lines_out = [table_row(tool, t, s) for tool, t, s in rows]
    for label, at in reversed(list(groups.items())):  # each tool's mean row after its last run
        if len(at) > 1:
            lines_out.insert(at[-1] + 1, mean_row(f"{label}, mean of {len(at)} runs", [rows[i] for i in at]))
    table = markdown_table(lines_out)
    print()
    print(table)
    for n in notes:
        print(f"note: {n}")
    for tool, _, s in rows:
        if s.get("n_missing"):
            print(f"note: {tool}: {s['n_missing']} particles missing from its table (scored as unassigned)")

    if not args.no_readme and rows:
        if p["views"] == "uniform":
            views = f"views uniform over the sphere ({p['n_views']} bins) plus a rare view at {p['rare_fraction']:.0%}"
        else:
            views = f"{p['n_views']} {p['views']} views, one at {p['rare_fraction']:.0%}"
        dataset = (f"{p['n']} particles, {p['box']} px, SNR {p['snr']:g}, {p['junk_fraction']:.0%} junk, "
                   f"{views}, K = {p['classes']}, seed {args.seed}")
        lines = [
            SECTION,
            "",
            "Produced by `benchmarks/quality.py` (ground-truth scores from `cryo2d.evaluate`: a junk class",
            "is more than half junk; purity = mean dominant-view fraction of the non-junk classes;",
            "median NCC = best rotation/shift normalised cross-correlation of each non-junk class average",
            "with the clean projection of its dominant view). Each preset's latest figures:",
            "",
            f"### Preset `{name}`: {dataset}",
            "",
            f"{time.strftime('%Y-%m-%d')}, {_cpu_name()}, {os.cpu_count()} cores; RELION 3.1 (CPU, `--j 2`).",
            "",
            table,
            "",
            *(f"Note: {n}" for n in notes),
            "",
            "Commands:",
            "",
            "```",
            shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]),
            *(f"{k}: {v}".replace(f"{REPO}/", "") for k, v in commands.items()),
            "```",
            "",
        ]
        update_readme(_merge_preset("\n".join(lines), name))
        print(f"\nwrote {README} ({SECTION})")
    return 0


def _merge_preset(block: str, name: str) -> str:
    """Keep the other preset's figures from the README section, replace this preset's."""
    if not README.exists():
        return block
    text = README.read_text()
    start = text.find(SECTION)
    if start < 0:
        return block
    nxt = text.find("\n## ", start + len(SECTION))
    old = text[start: nxt if nxt >= 0 else len(text)]
    kept = [part for part in old.split("\n### ")[1:] if not part.startswith(f"Preset `{name}`")]
    head, _, mine = block.partition("\n### ")
    parts = sorted(["### " + k.rstrip() for k in kept] + ["### " + mine.rstrip()])
    return head.rstrip() + "\n\n" + "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
