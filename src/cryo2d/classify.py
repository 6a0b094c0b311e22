"""``classify``: particle file in, job folder out (the library call the CLI wraps)."""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from functools import partial
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cryo2d._callable import make_callable
from cryo2d.contrast import settle_contrast
from cryo2d.ctf import boost_note
from cryo2d.em.config import EMConfig
from cryo2d.em.engine import EMResult, run_em
from cryo2d.em.finalize import align_vertical, duplicate_mask, sort_order
from cryo2d.errors import Cryo2DError
from cryo2d.gallery.render import render_gallery
from cryo2d.io import check_finite, nonfinite_indices, read_particles, write_particles, write_stack
from cryo2d.io.cs import passthrough_note, project_blob_path
from cryo2d.io.csg import write_templates
from cryo2d.io.outputs import make_output_folder, refuse_overwriting_inputs, remove_stale, write_text_atomic
from cryo2d.io.star import name_from_here, write_blocks
from cryo2d.particles import Assignments, ParticleSet
from cryo2d.picks import pick_locations

#: The files a classification job writes into its folder.
JOB_FILES = ("classes.mrcs", "classes_unmasked.mrcs", "classes.star", "class_averages.cs", "class_averages.csg",
             "particles.star", "particles.cs", "particles.csg", "duplicates.star", "duplicates.cs", "duplicates.csg",
             "gallery.png", "iterations.jsonl", "checkpoint.pt")
#: Of those, the files of the result itself (:func:`write_job`), all from one run.
_RESULT_FILES = tuple(name for name in JOB_FILES if name not in ("iterations.jsonl", "checkpoint.pt"))


@dataclass
class ClassifyResult:
    """What ``classify`` wrote, in memory (classes in output order)."""

    classes: np.ndarray
    counts: np.ndarray
    resolution_angst: np.ndarray
    assignments: Assignments
    history: list
    out_dir: Path
    n_duplicates: int
    n_bad: int
    empty_class: int = -1  # the class of the empty boxes (output order), -1 for none
    classes_unmasked: np.ndarray | None = None  # before the solvent mask (--flatten-solvent), output order
    ctf_note: str | None = None  # :func:`cryo2d.ctf.boost_note` of the particles, when the CTF is used
    contrast_note: str | None = None  # :func:`cryo2d.contrast.settle_contrast`'s note: the images were inverted


class _Subset:
    """An ImageSource restricted to some rows of another (after dropping bad images)."""

    def __init__(self, stack, rows: np.ndarray) -> None:
        self.stack, self.rows, self.box = stack, rows, stack.box

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, idx: np.ndarray) -> np.ndarray:
        return self.stack.read(self.rows[np.asarray(idx)])

    def inverted(self) -> "_Subset":
        return _Subset(self.stack.inverted(), self.rows)


def origins_note(prior_shift_px: np.ndarray) -> str:
    """The line that says the particles start from their input origins ((n, 2) px, ``ParticleSet.prior_shift_px``)."""
    distance = np.hypot(*np.asarray(prior_shift_px).T)
    return (f"each particle starts from its input origin (median {np.median(distance):.2g} px, largest "
            f"{distance.max():.2g} px from the box centre; --no-input-shifts starts from the centre)")


def checkpoint_note(checkpoint: Path, resume: bool) -> str | None:
    """The line that says a run starts from the beginning although ``--resume`` or a checkpoint suggests otherwise.

    None when the two agree: ``resume`` with a checkpoint (the run continues
    it) or neither (a new job).
    """
    exists = Path(checkpoint).exists()
    if resume and not exists:
        return f"no checkpoint in {Path(checkpoint).parent}; --resume starts from the first iteration"
    if exists and not resume:
        return f"{Path(checkpoint).parent} holds an earlier run's checkpoint; starting over (--resume continues it)"
    return None


def subset_particles(particles: ParticleSet, rows: np.ndarray) -> ParticleSet:
    """The particles at ``rows`` (table rows renumbered; extra format data kept)."""
    extra = dict(particles.extra)
    if "cs_array" in extra:
        extra["cs_array"] = extra["cs_array"][rows]
    return replace(
        particles,
        stack=_Subset(particles.stack, rows),
        ctf=None if particles.ctf is None else particles.ctf.subset(rows),
        pixel_size_angst=np.asarray(particles.pixel_size_angst)[rows],
        table=particles.table.iloc[rows].reset_index(drop=True),
        extra=extra,
        prior_shift_px=None if particles.prior_shift_px is None else particles.prior_shift_px[rows],
    )


def classify(
    particles: str | os.PathLike | ParticleSet,
    out_dir: str | os.PathLike,
    config: EMConfig,
    *,
    device: str = "cpu",
    project_dir: str | os.PathLike | None = None,
    resume: bool = False,
    skip_bad: bool = False,
    on_iteration: Callable[[dict], None] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    on_note: Callable[[str], None] | None = None,
) -> ClassifyResult:
    """Run 2D classification and write the job folder (DESIGN §4).

    Parameters
    ----------
    particles : path or ParticleSet
        RELION STAR or CryoSPARC .cs (or an already read set).
    out_dir : path
        Job folder: classes.mrcs, classes.star, particles.star (or .cs),
        gallery.png, iterations.jsonl, checkpoint.pt; classes_unmasked.mrcs
        with ``config.flatten_solvent``.
    config : EMConfig
    device : str
        "cpu" or "cuda".
    project_dir : path, optional
        The project folder that relative image paths start from (CryoSPARC's
        for .cs blob paths, RELION's for STAR image names).
    resume : bool
        Continue from ``out_dir/checkpoint.pt``.
    skip_bad : bool
        Drop images with NaN/Inf pixels (reported) instead of refusing.
    on_iteration : callable, optional
        Called with each iteration's log record.
    workers : int, optional
        Run the full iterations on a local Dask cluster of this many
        single-threaded worker processes (``cryo2d.em.distributed``).
    scheduler : str, optional
        Run them on the workers of a running Dask scheduler (``tcp://HOST:PORT``).
    on_note : callable, optional
        Called with a line for the user before the run starts: the particles
        looked dark and were inverted (``config.invert_contrast`` None), or
        looked bright and were inverted all the same (True); the particles
        start from their input origins (``config.input_shifts``); a .cs
        input's CTF or pick locations came from its passthrough file. Then,
        one line per stage of the split start (``config.start`` "split") as it
        ends.
    """
    if workers is not None and scheduler is not None:
        raise Cryo2DError("--workers and --scheduler: give one of them")
    if workers is not None and workers < 1:
        raise Cryo2DError(f"--workers must be at least 1 (got {workers})")
    if not isinstance(particles, ParticleSet):
        particles = read_particles(particles, project_dir=project_dir, no_ctf=not config.use_ctf)
    if on_note is not None and (note := passthrough_note(particles)) is not None:
        on_note(note)
    inputs = [particles.source, *particles.extra.get("metafiles", []), *getattr(particles.stack, "files", [])]
    refuse_overwriting_inputs(out_dir, JOB_FILES, inputs)
    n_bad, rows = 0, None
    if skip_bad:
        bad = nonfinite_indices(particles.stack)
        if len(bad):
            n_bad = len(bad)
            rows = np.setdiff1d(np.arange(len(particles)), bad)
            particles = subset_particles(particles, rows)
    else:
        check_finite(particles.stack)
    particles, contrast_note = settle_contrast(particles, config.invert_contrast)
    if contrast_note is not None and on_note is not None:
        on_note(contrast_note)
    if config.input_shifts and particles.prior_shift_px is not None and on_note is not None:
        on_note(origins_note(particles.prior_shift_px))
    out = make_output_folder(out_dir)
    checkpoint = out / "checkpoint.pt"
    if on_note is not None and (note := checkpoint_note(checkpoint, resume)) is not None:
        on_note(note)
    log_path = out / "iterations.jsonl"
    lines: list[str] = []  # a resumed run replays the checkpoint's records first
    # A run that starts over replaces an earlier run's checkpoint and log with its first
    # iteration's; that earlier run's results go then too, so that a run stopped before its end
    # (Ctrl-C, a crash) does not leave them beside its own log for select and view to read.
    # Until then (an error while the run starts) the earlier job is left whole.
    stale_results = not (resume and checkpoint.exists())

    def _log(record: dict) -> None:
        nonlocal stale_results
        lines.append(json.dumps(record))
        write_text_atomic(log_path, "\n".join(lines) + "\n")
        if stale_results:
            remove_stale(out, _RESULT_FILES, ())
            stale_results = False
        if on_iteration is not None:
            on_iteration(record)

    with ExitStack() as stack:
        make_pass = None
        if workers is not None or scheduler is not None:
            from cryo2d.em.distributed import DaskPass, dask_client, source_of

            source = source_of(particles, project_dir, rows)
            client = stack.enter_context(dask_client(workers=workers, scheduler=scheduler))
            make_pass = partial(DaskPass, client, source)
        result = run_em(particles, config, device=device, on_iteration=_log, checkpoint=checkpoint,
                        resume=resume, make_pass=make_pass, on_note=on_note)
    final = finalize(result, particles, config)
    write_job(final, particles, out, result.geometry.pixel_size_angst)
    final.out_dir = out
    final.n_bad = n_bad
    if config.use_ctf:
        final.ctf_note = boost_note(particles.ctf, particles.pixel_size_angst)
    final.contrast_note = contrast_note
    return final


def finalize(result: EMResult, particles: ParticleSet, config: EMConfig) -> ClassifyResult:
    """Sort classes, align filaments, mark duplicates: the job's final numbers."""
    K = len(result.classes)
    keep = np.ones(len(result.class_index), dtype=bool)
    if config.remove_duplicates:
        picks = pick_locations(particles)
        if picks is not None:
            mic, xy = picks
            psize = np.asarray(particles.pixel_size_angst, dtype=np.float64)
            centre = xy + result.shift_px * psize[:, None]
            sep = config.min_separation_angst or 0.5 * result.geometry.particle_diameter_angst
            keep = duplicate_mask(mic, centre, result.max_prob, sep)
    # Sorted by the counts written (duplicates left out): largest first as classes.star says.
    kept = np.bincount(result.class_index[keep & (result.class_index >= 0)], minlength=K).astype(np.float64)
    order = sort_order(kept) if config.sort_classes else np.arange(K)
    new_of_old = np.empty(K, dtype=np.int64)
    new_of_old[order] = np.arange(K)
    classes = result.classes[order]
    unmasked = None if result.classes_unmasked is None else result.classes_unmasked[order]
    class_index = np.where(result.class_index >= 0, new_of_old[np.maximum(result.class_index, 0)], -1)
    psi = result.psi_deg
    if config.align_filaments:
        classes, psi, unmasked = align_vertical(classes, psi, class_index, also=unmasked)
    counts = kept[order]
    assignments = Assignments(
        class_index=class_index,
        psi_deg=psi,
        shift_px=result.shift_px,
        max_prob=result.max_prob,
        class_posterior=result.class_posterior,
        class_ess=result.class_ess,
        scale=result.scale,
        keep=keep,
    )
    return ClassifyResult(
        classes=classes.astype(np.float32),
        counts=counts,
        resolution_angst=result.resolution_angst[order],
        assignments=assignments,
        history=result.history,
        out_dir=Path("."),
        n_duplicates=int((~keep).sum()),
        n_bad=0,
        empty_class=int(new_of_old[result.empty_class]) if result.empty_class >= 0 else -1,
        classes_unmasked=None if unmasked is None else unmasked.astype(np.float32),
    )


def write_job(final: ClassifyResult, particles: ParticleSet, out: Path, pixel_size_angst: float) -> None:
    """Write classes.mrcs, classes.star, particles.star/.cs (+ duplicates), gallery.png; class_averages.cs for .cs."""
    K = len(final.classes)
    write_stack(out / "classes.mrcs", final.classes, pixel_size_angst)
    written = {"classes.mrcs", "classes.star", "gallery.png"}
    if final.classes_unmasked is not None:  # as RELION's run_unmasked_classes.mrcs
        write_stack(out / "classes_unmasked.mrcs", final.classes_unmasked, pixel_size_angst)
        written.add("classes_unmasked.mrcs")
    total = max(float(final.counts.sum()), 1.0)
    table = pd.DataFrame(
        {
            "rlnReferenceImage": [f"{k + 1:06d}@{name_from_here(out / 'classes.mrcs')}" for k in range(K)],
            "rlnClassNumber": np.arange(1, K + 1),
            "rlnClassParticleCount": final.counts.astype(int),
            "rlnClassDistribution": final.counts / total,
            "rlnEstimatedResolution": final.resolution_angst,
        }
    )
    write_blocks({"classes": table}, out / "classes.star")
    if particles.kind == "cs":  # the classes as CryoSPARC's class_averages (a template group), blob/idx = class
        blob_path = project_blob_path(particles, out / "classes.mrcs")
        write_templates(out / "class_averages.cs", blob_path, np.arange(K), final.classes.shape[-1], pixel_size_angst,
                        final.resolution_angst)
        written |= {"class_averages.cs", "class_averages.csg"}
    keep = final.assignments.keep
    suffixes = (".star",) if particles.kind == "star" else (".cs", ".csg")
    rows = np.nonzero(keep)[0]
    write_particles(particles, out / f"particles{suffixes[0]}", assignments=final.assignments, rows=rows)
    written |= {f"particles{x}" for x in suffixes}
    if (~keep).any():
        write_particles(particles, out / f"duplicates{suffixes[0]}", assignments=final.assignments, rows=np.nonzero(~keep)[0])
        written |= {f"duplicates{x}" for x in suffixes}
    render_gallery(final.classes, final.counts, final.resolution_angst, out / "gallery.png", empty_class=final.empty_class)
    # An earlier run's outputs that this one does not replace (the other input format's particle
    # files, duplicates when there are none now, classes_unmasked.mrcs) would be read in place of
    # this run's by select and rebalance: they go.
    remove_stale(out, _RESULT_FILES, written)


make_callable(__name__)  # cryo2d.classify(...) calls classify above (cryo2d._callable)
