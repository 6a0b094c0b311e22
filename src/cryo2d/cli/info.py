"""Summarise a particle file: count, box, pixel size, optics groups, CTF ranges.

Reads a RELION STAR (3.0 or 3.1+), CryoSPARC .cs or .csg file and checks its image
stacks (headers, sizes, image numbers, box sizes). When a stack is missing or
broken, the metadata is still printed, then the error, and the exit code is 1;
--no-images skips the stacks.

examples:
  $ cryo2d info particles.star
  $ cryo2d info J24/J24_001_particles.cs --project-dir /data/P12 --json
  $ cryo2d info particles.star --check-pixels     # also scan every image for NaN/Inf, and measure the contrast
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cryo2d.errors import Cryo2DError
from cryo2d.io import check_finite, open_stack, read_particles
from cryo2d.particles import ParticleSet


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="particle file (.star, .cs or .csg)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for programs)")
    parser.add_argument("--project-dir", metavar="DIR",
                        help="project folder that relative image paths start from (CryoSPARC's blob/path, "
                             "RELION's image names)")
    parser.add_argument("--no-ctf", action="store_true", help="leave the CTF columns out (as classify --no-ctf reads the file)")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--no-images", action="store_true", help="metadata only: do not open the image stacks")
    images.add_argument("--check-pixels", action="store_true",
                        help="read every image and refuse NaN/Inf pixels; say whether the protein is bright or dark")


def summarize(particles: ParticleSet) -> dict[str, Any]:
    """The ``info --json`` summary of a particle set.

    Returns
    -------
    dict
        ``n_particles``; ``box`` (px, None when unknown); ``pixel_size`` (Å),
        ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast``: a number, or
        the sorted list of distinct values when there are several;
        ``n_optics_groups``; ``defocus_min``/``defocus_max`` (Å, over U and V);
        ``bfactor_min``/``bfactor_max`` (Å², ``_rlnCtfBfactor``: 0 when absent) and
        ``ctf_scale_min``/``ctf_scale_max`` (``_rlnCtfScalefactor``: 1 when absent).
        CTF values are None when the set has no CTF. ``input_shift_median`` and
        ``input_shift_max``: the particles' input origins as shifts, px
        (``ParticleSet.prior_shift_px``; None when the file gives none or all
        zero). ``passthrough``: for a .cs file, the CryoSPARC passthrough
        files whose fields were read with it (names; None when none). (``info --check-pixels``
        adds ``contrast_z`` and ``contrast_images``: :func:`cryo2d.contrast.contrast_z`.)
    """
    ctf = particles.ctf
    defocus = None if ctf is None else np.concatenate([ctf.defocus_u_angst, ctf.defocus_v_angst])
    shift = None if particles.prior_shift_px is None else np.hypot(*particles.prior_shift_px.T)
    return {
        "n_particles": len(particles),
        "box": particles.box or None,
        "pixel_size": _distinct(particles.pixel_size_angst),
        "n_optics_groups": _n_optics_groups(particles),
        "defocus_min": None if defocus is None else _shortest(defocus.min()),
        "defocus_max": None if defocus is None else _shortest(defocus.max()),
        "voltage": None if ctf is None else _distinct(ctf.voltage_kv),
        "cs": None if ctf is None else _distinct(ctf.cs_mm),
        "amplitude_contrast": None if ctf is None else _distinct(ctf.amplitude_contrast),
        "bfactor_min": None if ctf is None else _shortest(ctf.bfactor_angst2.min()),
        "bfactor_max": None if ctf is None else _shortest(ctf.bfactor_angst2.max()),
        "ctf_scale_min": None if ctf is None else _shortest(ctf.amplitude_scale.min()),
        "ctf_scale_max": None if ctf is None else _shortest(ctf.amplitude_scale.max()),
        "input_shift_median": None if shift is None else round(float(np.median(shift)), 2),
        "input_shift_max": None if shift is None else round(float(shift.max()), 2),
        "passthrough": [path.name for path, _ in particles.extra.get("passthrough") or []] or None,
    }


def _distinct(values: np.ndarray) -> float | list[float]:
    unique = [_shortest(v) for v in np.unique(values)]
    return unique[0] if len(unique) == 1 else unique


def _shortest(value: float) -> float:
    """``value``, printed as its float32 if it is one (.cs 2.95, not 2.950000047683716)."""
    single = np.float32(value)
    return float(np.format_float_positional(single, unique=True)) if float(single) == value else float(value)


def _n_optics_groups(particles: ParticleSet) -> int:
    """STAR: rows of data_optics (3.0 files: 1). .cs: distinct ctf/exp_group_id (else 1)."""
    if particles.kind == "star":
        optics = particles.extra.get("optics")
        return 1 if optics is None else len(optics)
    if "ctf/exp_group_id" in particles.table:
        return int(particles.table["ctf/exp_group_id"].nunique())
    return 1


def _text(summary: dict[str, Any], particles: ParticleSet) -> str:
    def fmt(value: Any, unit: str = "") -> str:
        if value is None:
            return "none"
        if isinstance(value, list):
            return ", ".join(f"{v:g}" for v in value) + unit
        return f"{value:g}{unit}"

    if particles.kind == "star":
        kind = f"RELION {particles.extra.get('star_version', '')} STAR"
    else:
        kind = "CryoSPARC result group" if Path(particles.source).suffix.lower() == ".csg" else "CryoSPARC .cs"
    defocus = (
        "none (no CTF)" if summary["defocus_min"] is None
        else f"{summary['defocus_min']:.1f} - {summary['defocus_max']:.1f} Å"
    )
    box = "unknown" if summary["box"] is None else f"{summary['box']} px"
    rows = [
        ("file", f"{particles.source} ({kind})"),
        ("particles", str(summary["n_particles"])),
        ("box", box),
        ("pixel size", fmt(summary["pixel_size"], " Å")),
        ("optics groups", str(summary["n_optics_groups"])),
        ("defocus", defocus),
        ("voltage", fmt(summary["voltage"], " kV")),
        ("Cs", fmt(summary["cs"], " mm")),
        ("amp. contrast", fmt(summary["amplitude_contrast"])),
    ]
    # Shown when the file sets them (RELION's defaults: B 0, scale 1).
    if summary["bfactor_min"] is not None and (summary["bfactor_min"], summary["bfactor_max"]) != (0.0, 0.0):
        rows.append(("CTF B-factor", f"{summary['bfactor_min']:g} - {summary['bfactor_max']:g} Å²"))
    if summary["ctf_scale_min"] is not None and (summary["ctf_scale_min"], summary["ctf_scale_max"]) != (1.0, 1.0):
        rows.append(("CTF scale", f"{summary['ctf_scale_min']:g} - {summary['ctf_scale_max']:g}"))
    if summary["passthrough"]:
        rows.append(("passthrough", ", ".join(summary["passthrough"]) + " (CryoSPARC's passed-through fields, by uid)"))
    if summary["input_shift_median"] is not None:
        rows.append(("input origins", f"shifts of median {summary['input_shift_median']:g} px, largest "
                                      f"{summary['input_shift_max']:g} px: classify starts from them"))
    if "contrast_z" in summary:
        from cryo2d.contrast import DARK_Z

        z = summary["contrast_z"]
        looks = ("dark protein: classify and stream invert it" if z < DARK_Z
                 else "bright protein" if z > -DARK_Z else "not clear")
        rows.append(("contrast", f"{looks} (z = {z:+.1f} over {summary['contrast_images']} images)"))
    return "\n".join(f"{name:<15}{value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    particles = read_particles(args.file, project_dir=args.project_dir, no_ctf=args.no_ctf, open_stacks=False)
    stack_error = None
    if not args.no_images:
        try:
            particles = open_stack(particles)
            if args.check_pixels:
                check_finite(particles.stack)
        except Cryo2DError as err:
            stack_error = err
    summary = summarize(particles)
    if args.check_pixels and stack_error is None:
        from cryo2d.contrast import contrast_z  # imports torch: only when the images are read

        z, used = contrast_z(particles)
        summary.update(contrast_z=round(z, 2), contrast_images=used)
    print(json.dumps(summary) if args.json else _text(summary, particles))
    if stack_error is not None:
        raise stack_error
    return 0
