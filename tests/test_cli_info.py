"""``cryo2d info``: the numbers it prints are the ones in the file."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "io"))
from particle_files import make_cs_dataset, make_star_dataset, run_cli, shared_data  # noqa: E402

KEYS = ["n_particles", "box", "pixel_size", "n_optics_groups", "defocus_min", "defocus_max",
        "voltage", "cs", "amplitude_contrast", "bfactor_min", "bfactor_max", "ctf_scale_min", "ctf_scale_max", "input_shift_median", "input_shift_max",
        "passthrough"]


def test_info_json_star_two_optics_groups(tmp_path, monkeypatch, capsys):
    star, _, ctf = make_star_dataset(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "info", star, "--json")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert list(summary) == KEYS
    defocus = np.concatenate([ctf["defocus_u_angst"], ctf["defocus_v_angst"]])
    assert summary == {
        "n_particles": 12, "box": 16, "pixel_size": [1.5, 2.0], "n_optics_groups": 2,
        "defocus_min": defocus.min(), "defocus_max": defocus.max(),
        "voltage": [200.0, 300.0], "cs": 2.7, "amplitude_contrast": [0.07, 0.1],
        "bfactor_min": 0.0, "bfactor_max": 0.0, "ctf_scale_min": 1.0, "ctf_scale_max": 1.0,
        "input_shift_median": None, "input_shift_max": None, "passthrough": None,
    }


def test_info_json_cs(tmp_path, monkeypatch, capsys):
    _, cs, _, ctf = make_cs_dataset(tmp_path)
    code, out, _ = run_cli(monkeypatch, capsys, "info", cs, "--json", "--project-dir", tmp_path)
    summary = json.loads(out)
    assert code == 0
    assert summary["n_particles"] == 12 and summary["box"] == 16 and summary["n_optics_groups"] == 2
    assert summary["pixel_size"] == [1.5, 2.0] and summary["voltage"] == [200.0, 300.0]
    assert summary["defocus_max"] == pytest.approx(ctf["defocus_u_angst"].max(), rel=1e-7)


def test_info_text(tmp_path, monkeypatch, capsys):
    star, _, _ = make_star_dataset(tmp_path, version="3.0")
    code, out, _ = run_cli(monkeypatch, capsys, "info", star)
    assert code == 0
    assert "(RELION 3.0 STAR)" in out
    for line in ("particles      12", "box            16 px", "pixel size     2 Å", "optics groups  1",
                 "voltage        300 kV", "Cs             2.7 mm", "amp. contrast  0.1"):
        assert line in out.splitlines()


def test_info_into_a_closed_pipe_stops_quietly(tmp_path):
    """`cryo2d info X | head`: the reader closed the pipe before the text came; no traceback."""
    import subprocess

    star, _, _ = make_star_dataset(tmp_path)
    child = subprocess.Popen([sys.executable, "-m", "cryo2d", "info", str(star)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # before the child has imported anything, let alone written
    err = child.stderr.read().decode()
    assert child.wait() == 141 and err == "", err


def test_info_input_origins(tmp_path, monkeypatch, capsys):
    """Origins in the file (px in 3.0) are shown as the shifts classify starts from."""
    import starfile

    star, _, _ = make_star_dataset(tmp_path, version="3.0")
    blocks = starfile.read(star, always_dict=True)
    name = next(iter(blocks))
    blocks[name]["rlnOriginX"] = [3.0, 0.0, -4.0] * 4
    blocks[name]["rlnOriginY"] = [4.0, 0.0, 0.0] * 4
    starfile.write(blocks, star, overwrite=True)
    code, out, _ = run_cli(monkeypatch, capsys, "info", star)
    assert code == 0
    assert "input origins  shifts of median 4 px, largest 5 px: classify starts from them" in out.splitlines()


def test_info_real_relion31(monkeypatch, capsys):
    star = shared_data("particles/cryodrgn_relion31/relion31.star")
    code, out, _ = run_cli(monkeypatch, capsys, "info", star, "--json", "--check-pixels")
    summary = json.loads(out)
    assert code == 0
    assert summary["pixel_size"] == 2.806 and summary["box"] == 256 and summary["n_particles"] == 5
    assert summary["voltage"] == 300.0 and summary["cs"] == 0.01 and summary["amplitude_contrast"] == 0.1
    assert summary["contrast_images"] == 5 and 0 < summary["contrast_z"] < 5  # bright, but 5 images say little


def test_info_contrast_of_real_80s_particles(tmp_path, monkeypatch, capsys):
    """RELION-extracted ribosomes read as bright protein; the same images times -1 as dark."""
    import shutil

    import mrcfile

    from cryo2d.io import write_stack

    star = shared_data("particles/aspire_sample_80S/sample_relion30.star")
    code, out, _ = run_cli(monkeypatch, capsys, "info", star, "--check-pixels")
    row = [line for line in out.splitlines() if line.startswith("contrast")]
    assert code == 0 and row == ["contrast       bright protein (z = +8.8 over 17 images)"]
    shutil.copy(star, tmp_path / "sample.star")
    write_stack(tmp_path / "sample.mrcs", -mrcfile.read(star.parent / "sample.mrcs"), 1.338)
    code, out, _ = run_cli(monkeypatch, capsys, "info", tmp_path / "sample.star", "--check-pixels", "--json")
    assert code == 0 and json.loads(out)["contrast_z"] == pytest.approx(-8.8, abs=0.05)
    code, out, _ = run_cli(monkeypatch, capsys, "info", tmp_path / "sample.star")
    assert not [line for line in out.splitlines() if line.startswith("contrast")]  # only with --check-pixels


def test_info_real_sample_two_voltages(monkeypatch, capsys):
    star = shared_data("particles/aspire_sample_80S/sample_relion31.star")
    code, out, _ = run_cli(monkeypatch, capsys, "info", star, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["n_optics_groups"] == 2 and summary["voltage"] == [200.0, 300.0]
    assert summary["pixel_size"] == 1.4 and summary["box"] == 200


def test_info_real_cs_without_stacks(monkeypatch, capsys):
    """Metadata is printed even when the stacks are absent; the missing stack is the one error line."""
    cs = shared_data("metadata/cryosparc_P12_J24_001_particles.cs")
    code, out, err = run_cli(monkeypatch, capsys, "info", cs, "--json")
    summary = json.loads(out)
    assert code == 1 and len(err.splitlines()) == 1 and "not found" in err
    assert summary["n_particles"] == 2019 and summary["box"] == 180 and summary["pixel_size"] == 2.95
    assert summary["defocus_max"] == pytest.approx(45842.97, abs=0.01)
    code, out, err = run_cli(monkeypatch, capsys, "info", cs, "--json", "--no-images")
    assert code == 0 and err == "" and json.loads(out) == summary


def test_info_real_tilt_series_b_factors_and_scales(monkeypatch, capsys):
    """Warp's tilt-series export: dose as _rlnCtfBfactor, cos(tilt) as _rlnCtfScalefactor, both shown."""
    star = shared_data("particles/cryodrgn_sta_ribosome_bin8/sta_testing_bin8.star")
    code, out, _ = run_cli(monkeypatch, capsys, "info", star, "--json", "--no-images")
    summary = json.loads(out)
    assert code == 0 and summary["n_particles"] == 219
    assert (summary["bfactor_min"], summary["bfactor_max"]) == (-507.0, -13.0)
    assert (summary["ctf_scale_min"], summary["ctf_scale_max"]) == (0.5, 1.0)
    code, out, _ = run_cli(monkeypatch, capsys, "info", star, "--no-images")
    assert "CTF B-factor   -507 - -13 Å²" in out.splitlines() and "CTF scale      0.5 - 1" in out.splitlines()


def test_info_metadata_only_star_box_unknown(monkeypatch, capsys):
    star = shared_data("metadata/FinalRefinement-OriginalParticles-PfCRT.star")
    code, out, err = run_cli(monkeypatch, capsys, "info", star, "--no-ctf", "--no-images")
    assert code == 0 and err == ""
    assert "box            unknown" in out and "pixel size     1.035 Å" in out


def test_info_no_images_and_check_pixels_are_refused_together(tmp_path, monkeypatch, capsys):
    """The two contradict each other: a usage error naming both, before anything is read or printed."""
    star, _, _ = make_star_dataset(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(monkeypatch, capsys, "info", star, "--no-images", "--check-pixels")
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "argument --check-pixels: not allowed with argument --no-images" in err
