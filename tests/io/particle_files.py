"""Small particle datasets written with mrcfile/starfile/numpy for the io tests.

Written by the test side on purpose (not by cryo2d.io), so the readers are
checked against files they did not produce.
"""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryo2d.particles import Assignments

SHARED_DATA = Path(__file__).parents[2] / ".." / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file of /work/shared/data (beside the repo), or skip the test."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared test data not present: {relative}")
    return path


def write_mrcs(path: Path, images: np.ndarray, pixel_size_angst: float = 1.0) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(images, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size_angst
    return path


def ctf_values(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-particle CTF values in RELION units (Å, degrees, kV, mm)."""
    rng = np.random.default_rng(seed)
    defocus_u = rng.uniform(8000, 30000, n).round(2)
    return {
        "defocus_u_angst": defocus_u,
        "defocus_v_angst": (defocus_u - rng.uniform(0, 500, n)).round(2),
        "defocus_angle_deg": rng.uniform(-180, 180, n).round(3),
        "phase_shift_deg": rng.uniform(0, 90, n).round(3),
    }


def make_star_dataset(
    folder: Path, *, n: int = 12, box: int = 16, version: str = "3.1", seed: int = 0
) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    """Two stacks (stack0.mrcs: first half, stack1.mrcs: rest, rows interleaved)
    and particles.star; returns (star path, images (n, box, box) in row order, CTF values).

    3.1: two optics groups (300 kV / 1.5 Å, 200 kV / 2.0 Å; odd rows in group 2).
    3.0: one block ``particles`` with per-row _rlnVoltage and _rlnImagePixelSize.
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    half = n // 2
    write_mrcs(folder / "stack0.mrcs", images[:half])
    write_mrcs(folder / "stack1.mrcs", images[half:])
    names = [f"{i + 1:06d}@stack0.mrcs" if i < half else f"{i - half + 1:06d}@stack1.mrcs" for i in range(n)]
    order = rng.permutation(n)
    ctf = ctf_values(n, seed)
    group = np.where(np.arange(n) % 2 == 0, 1, 2)
    table = pd.DataFrame({
        "rlnCoordinateX": rng.uniform(0, 4000, n).round(3),
        "rlnImageName": [names[i] for i in order],
        "rlnMicrographName": [f"mic{i % 3}.mrc" for i in range(n)],
        "rlnDefocusU": ctf["defocus_u_angst"],
        "rlnDefocusV": ctf["defocus_v_angst"],
        "rlnDefocusAngle": ctf["defocus_angle_deg"],
        "rlnPhaseShift": ctf["phase_shift_deg"],
        "rlnClassNumber": np.full(n, 7),
    })
    if version == "3.1":
        table["rlnOpticsGroup"] = group
        optics = pd.DataFrame({
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnOpticsGroup": [1, 2],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.7],
            "rlnAmplitudeContrast": [0.1, 0.07],
            "rlnImagePixelSize": [1.5, 2.0],
            "rlnImageSize": [box, box],
            "rlnImageDimensionality": [2, 2],
        })
        blocks = {"optics": optics, "particles": table}
        ctf["voltage_kv"] = np.where(group == 1, 300.0, 200.0)
        ctf["amplitude_contrast"] = np.where(group == 1, 0.1, 0.07)
        ctf["pixel_size_angst"] = np.where(group == 1, 1.5, 2.0)
    else:
        table["rlnVoltage"] = 300.0
        table["rlnSphericalAberration"] = 2.7
        table["rlnAmplitudeContrast"] = 0.1
        table["rlnDetectorPixelSize"] = 5.0
        table["rlnMagnification"] = 25000.0
        blocks = {"particles": table}
        ctf["voltage_kv"] = np.full(n, 300.0)
        ctf["amplitude_contrast"] = np.full(n, 0.1)
        ctf["pixel_size_angst"] = np.full(n, 2.0)
    ctf["cs_mm"] = np.full(n, 2.7)
    star = folder / "particles.star"
    starfile.write(blocks, star, float_format="%.6f")
    return star, images[order], ctf


def random_assignments(n: int, n_classes: int = 4, seed: int = 1) -> Assignments:
    rng = np.random.default_rng(seed)
    return Assignments(
        class_index=rng.integers(0, n_classes, n),
        psi_deg=rng.uniform(0, 360, n),
        shift_px=rng.uniform(-3, 3, (n, 2)),
        max_prob=rng.uniform(0, 1, n),
        class_posterior=rng.uniform(0.5, 1, n),
        class_ess=rng.uniform(1, 3, n),
        scale=rng.uniform(0.8, 1.2, n),
        keep=np.ones(n, dtype=bool),
    )


def make_cs_dataset(folder: Path, *, n: int = 12, box: int = 16, seed: int = 0):
    """The particles of ``make_star_dataset`` (3.1) also as ``J5/particles.cs``.

    ``blob/path`` is relative to ``folder`` (the project folder, parent of the
    .cs file's folder); stack1's entries start with ``>``. Returns
    (star path, cs path, images in row order, CTF values).
    """
    star, images, ctf = make_star_dataset(folder, n=n, box=box, seed=seed)
    names = starfile.read(star)["particles"]["rlnImageName"].str.partition("@")
    array = np.zeros(n, dtype=[
        ("uid", "<u8"), ("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"),
        ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"), ("alignments3D/pose", "<f4", (3,)),
    ])
    array["uid"] = np.arange(n) + 10**18
    array["blob/path"] = [(">" if s == "stack1.mrcs" else "") + s for s in names[2]]
    array["blob/idx"] = names[0].astype(int) - 1
    array["blob/shape"] = box
    array["blob/psize_A"] = ctf["pixel_size_angst"]
    array["blob/sign"] = 1.0  # protein bright, as the STAR's stacks (a RELION stack imported into CryoSPARC)
    array["ctf/type"] = b"ctffind4"
    array["ctf/exp_group_id"] = np.where(ctf["voltage_kv"] == 300.0, 1, 2)
    array["ctf/accel_kv"] = ctf["voltage_kv"]
    array["ctf/cs_mm"] = ctf["cs_mm"]
    array["ctf/amp_contrast"] = ctf["amplitude_contrast"]
    array["ctf/df1_A"] = ctf["defocus_u_angst"]
    array["ctf/df2_A"] = ctf["defocus_v_angst"]
    array["ctf/df_angle_rad"] = np.deg2rad(ctf["defocus_angle_deg"])
    array["ctf/phase_shift_rad"] = np.deg2rad(ctf["phase_shift_deg"])
    array["alignments3D/pose"] = np.random.default_rng(seed).normal(size=(n, 3))
    (folder / "J5").mkdir()
    cs = folder / "J5" / "particles.cs"
    with open(cs, "wb") as handle:
        np.save(handle, array)
    return star, cs, images, ctf


def rewrite_star(star: Path, change) -> Path:
    """Apply ``change(blocks)`` (edits the dict of DataFrames in place) and write back."""
    blocks = starfile.read(star, always_dict=True)
    change(blocks)
    starfile.write(blocks, star)
    return star


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """``cryo2d.cli.main.main(argv)`` with only the info command registered:
    returns (exit code, stdout, stderr)."""
    import cryo2d.cli.main as cli

    monkeypatch.setattr(cli, "COMMANDS", {"info": "info"})
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
