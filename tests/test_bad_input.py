"""Every bad input: exit code 1 and one stderr line naming the file and the problem."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "io"))
from particle_files import make_cs_dataset, make_star_dataset, rewrite_star, run_cli, write_mrcs  # noqa: E402

from cryo2d.errors import Cryo2DError  # noqa: E402
from cryo2d.io import check_finite, read_particles  # noqa: E402


@pytest.fixture
def info(monkeypatch, capsys):
    """Run ``cryo2d info PATH [ARGS]``; assert exit 1 and a single error line naming PATH; return it."""
    def run(path, *args):
        code, _, err = run_cli(monkeypatch, capsys, "info", path, *args)
        assert code == 1
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith(f"cryo2d: error: {path}: ")
        return err
    return run


@pytest.fixture
def star(tmp_path):
    return make_star_dataset(tmp_path)[0]


def test_missing_ctf_columns(star, info):
    rewrite_star(star, lambda blocks: blocks["particles"].pop("rlnDefocusU"))
    err = info(star)
    assert "column _rlnDefocusU missing (use --no-ctf to classify without CTF)" in err


def _set_image_name(star, row, name):
    def change(blocks):
        blocks["particles"].loc[row, "rlnImageName"] = name
    rewrite_star(star, change)


def test_image_past_end_of_stack(star, info):
    _set_image_name(star, 3, "000007@stack0.mrcs")
    assert "image 000007@stack0.mrcs is past the end of stack0.mrcs (6 images)" in info(star)


def test_missing_stack_file(star, info):
    (star.parent / "stack1.mrcs").unlink()
    assert "stack file stack1.mrcs not found" in info(star)


def test_mixed_box_sizes(star, info):
    write_mrcs(star.parent / "stack1.mrcs", np.zeros((6, 20, 20)))
    assert "mixed box sizes" in info(star) and "20 px" in info(star)


def test_non_square_images(star, info):
    write_mrcs(star.parent / "stack1.mrcs", np.zeros((6, 16, 20)))
    assert "stack1.mrcs has non-square images (20x16 px)" in info(star)


def test_truncated_mrc(star, info):
    stack = star.parent / "stack1.mrcs"
    stack.write_bytes(stack.read_bytes()[:-100])
    assert "stack1.mrcs is truncated" in info(star)


def test_not_an_mrc_file(star, info):
    (star.parent / "stack1.mrcs").write_text("this is not an MRC file\n" * 100)
    assert "stack1.mrcs is not an MRC file" in info(star)


def test_empty_stack_file(star, info):
    (star.parent / "stack1.mrcs").write_bytes(b"")
    assert "stack1.mrcs is not an MRC file" in info(star)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_pixels(star, info):
    images = np.zeros((6, 16, 16))
    images[2, 5, 5] = np.nan
    write_mrcs(star.parent / "stack1.mrcs", images)
    particles = read_particles(star)
    with pytest.raises(Cryo2DError, match=rf"^{star}: image 000003@stack1.mrcs has NaN/Inf pixels$"):
        check_finite(particles.stack, chunk=5)
    assert "image 000003@stack1.mrcs has NaN/Inf pixels" in info(star, "--check-pixels")


def test_no_pixel_size(tmp_path, info):
    star = make_star_dataset(tmp_path, version="3.0")[0]
    rewrite_star(star, lambda blocks: blocks["particles"].pop("rlnMagnification"))
    assert "no pixel size" in info(star)


def test_bad_pixel_size_value(tmp_path, info):
    star = make_star_dataset(tmp_path, version="3.0")[0]
    rewrite_star(star, lambda blocks: blocks["particles"].__setitem__("rlnDetectorPixelSize", 0.0))
    assert "pixel size of particle 1 is 0.0 (must be finite and > 0)" in info(star)


def test_undefined_optics_group(star, info):
    rewrite_star(star, lambda blocks: blocks["particles"].__setitem__("rlnOpticsGroup", 3))
    assert "optics group 3, which data_optics does not define" in info(star)


def test_malformed_image_name(star, info):
    _set_image_name(star, 0, "0@stack0.mrcs")
    assert "bad _rlnImageName '0@stack0.mrcs'" in info(star)


def test_no_particles(star, info):
    rewrite_star(star, lambda blocks: blocks.__setitem__("particles", blocks["particles"].iloc[:0]))
    assert "no particles" in info(star)


@pytest.mark.parametrize("name, text, problem", [
    ("model.star", "data_model\n\nloop_\n_rlnReferenceImage #1\nclass1.mrc\n",
     "no data block with an _rlnImageName column"),
    ("particles.txt", "x", "unknown particle file type '.txt'"),
    ("particles.cs", "not numpy", "not a CryoSPARC .cs file"),
], ids=["star-without-particles", "unknown-suffix", "cs-not-numpy"])
def test_wrong_kind_of_file(tmp_path, info, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    assert problem in info(path)


def test_a_star_file_that_is_not_utf8(star, info):
    """A Latin-1 micrograph name: the file and line that are not UTF-8, not "no particle block"."""
    text = star.read_text().replace("mic1.mrc", "mic\u00ef.mrc", 1)
    star.write_bytes(text.encode("latin-1"))
    line = text.splitlines().index(next(x for x in text.splitlines() if "mic\u00ef.mrc" in x)) + 1
    assert f"{star}: not UTF-8 text (byte 0xef on line {line})" in info(star)


def test_missing_file(tmp_path, info):
    assert "file not found" in info(tmp_path / "nothing.star")


def test_a_folder_given_for_the_particle_file(tmp_path, info):
    """A job folder given where its particles.star was meant: said so, with the file it holds."""
    job = tmp_path / "Class2D"
    job.mkdir()
    assert f"{job}: a folder, not a particle file (.star or .cs)" in info(job)
    (job / "particles.star").write_text("data_particles\n")
    assert f"(did you mean {job / 'particles.star'}?)" in info(job)


def test_cs_missing_ctf_field(tmp_path, info):
    cs = make_cs_dataset(tmp_path)[1]
    array = np.load(cs)
    keep = [name for name in array.dtype.names if name != "ctf/df1_A"]
    with open(cs, "wb") as handle:
        np.save(handle, array[keep])
    assert "field ctf/df1_A missing, and no CryoSPARC passthrough file beside it holds it" in info(cs)


def test_non_numeric_ctf_value(star, info):
    def change(blocks):
        table = blocks["particles"]
        table["rlnDefocusV"] = table["rlnDefocusV"].astype(object)
        table.loc[2, "rlnDefocusV"] = "abc"
    rewrite_star(star, change)
    assert "column _rlnDefocusV has a non-numeric value ('abc')" in info(star)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device(tmp_path, capsys, device):
    """An unknown --device is a one-line usage error before any work; the library raises Cryo2DError."""
    import torch

    from cryo2d.cli.main import main
    from cryo2d.em.config import check_device

    with pytest.raises(SystemExit) as exc:
        main(["classify", str(tmp_path / "p.star"), "-o", str(tmp_path / "job"), "--device", device])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --device: {device}: unknown device (cpu, cuda or cuda:N)" in err and "Traceback" not in err
    assert not (tmp_path / "job").exists()
    with pytest.raises(Cryo2DError, match=f"--device {device}: unknown device"):
        check_device(device)
    assert check_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(Cryo2DError, match="no CUDA device is available"):
            check_device("cuda")


@pytest.mark.parametrize("value, problem", [("0", "0 is fewer than 1 thread"), ("-2", "-2 is fewer than 1 thread"),
                                            ("two", "'two' is not a whole number")])
def test_bad_thread_count(tmp_path, capsys, value, problem):
    """--threads 0 used to mean "all cores" silently and a negative count raised a torch traceback."""
    from cryo2d.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["classify", str(tmp_path / "p.star"), "-o", str(tmp_path / "job"), "--threads", value])
    assert exc.value.code == 2
    assert f"argument --threads: {problem}" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["classify", "p.star", "-o", "job"], ["stream", "incoming", "-o", "job"]])
def test_no_full_pass_refused(capsys, command):
    """--full-iterations 0 ran one full pass all the same (every particle needs its class): now refused, one line."""
    from cryo2d.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([*command, "--full-iterations", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --full-iterations: 0: at least 1 (the last full pass gives every particle its class)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["classify", "p.star", "-o", "job"], ["stream", "incoming", "-o", "job"], ["simulate", "bundled", "-o", "sim"],
    ["demo", "-o", "demo"], ["rebalance", "job", "-o", "out"],
])
@pytest.mark.parametrize("value, problem", [("-1", "-1 is negative (seeds are whole numbers from 0)"),
                                            ("x", "'x' is not a whole number")])
def test_bad_seed(capsys, command, value, problem):
    """A negative --seed raised numpy's traceback ("expected non-negative integer") once the run started."""
    from cryo2d.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([*command, "--seed", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: {problem}" in err and "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [
    ("--settle-seconds", "-1", "--settle-seconds must be >= 0"), ("--stop-when-idle", "-5", "--stop-when-idle must be >= 0"),
    ("--poll-seconds", "0", "--poll-seconds must be positive"), ("--until", "0", "--until must be at least 1"),
])
def test_bad_stream_timing(tmp_path, capsys, option, value, message):
    """One error line before the stream starts watching (``--poll-seconds 0`` looked at the source in a busy loop)."""
    from cryo2d.cli.main import main

    assert main(["stream", str(tmp_path), "-o", str(tmp_path / "live"), option, value]) == 1
    assert capsys.readouterr().err == f"cryo2d: error: {message}\n"
    assert not (tmp_path / "live").exists()


@pytest.mark.parametrize("field, value, message", [
    ("seed", -1, "--seed must be >= 0"),
    ("min_separation_angst", -5.0, "--min-separation must be positive"),
    ("min_separation_angst", 0.0, "--min-separation must be positive"),
    ("mask_diameter_angst", -10.0, "--mask-diameter must be positive"),
    ("n_classes", 0, "--classes must be at least 1"),
])
def test_config_values_that_make_no_sense(field, value, message):
    from cryo2d.em.config import EMConfig

    with pytest.raises(Cryo2DError, match=message):
        EMConfig(**{field: value}).validate()


def test_every_float_parameter_must_be_finite(capsys):
    """inf or NaN raised tracebacks (--shift-range inf, --shift-step inf), ran on nonsense (--tau2-fudge inf;
    --min-separation inf made every pick a duplicate) or misled (--mask-diameter-outer nan: "images constant")."""
    import dataclasses

    from cryo2d.cli.main import main
    from cryo2d.em.config import _FLOAT_FLAGS, EMConfig

    floats = {f.name for f in dataclasses.fields(EMConfig) if "float" in str(f.type)}
    assert set(_FLOAT_FLAGS) == floats  # every float parameter is checked
    for name, flag in _FLOAT_FLAGS.items():
        for value in (math.inf, math.nan):
            with pytest.raises(Cryo2DError, match=f"^{flag} must be a finite number, got {value}$"):
                EMConfig(**{name: value}).validate()
    assert main(["classify", "p.star", "-o", "job", "--shift-range", "inf"]) == 1
    assert capsys.readouterr().err.strip() == "cryo2d: error: --shift-range must be a finite number, got inf"


@pytest.mark.parametrize("error, message", [
    ("gpu", "cryo2d: error: the GPU ran out of memory (--device cuda:0). Fewer --classes, a lower --max-align-res"),
    ("ram", "cryo2d: error: out of memory (RAM). Fewer --classes, a lower --max-align-res"),
    ("torch-cpu", "cryo2d: error: out of memory (RAM: 65.7 GiB asked for at once). Fewer --classes, a lower"),
])
def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, error, message):
    """Running out of GPU memory or RAM ends with one line that says what to lower, and exit 1;
    any other RuntimeError still raises (a bug keeps its traceback)."""
    import torch

    import cryo2d.cli.classify as classify_cli
    from cryo2d.cli.main import main

    def boom(args):
        if error == "gpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if error == "torch-cpu":  # what torch 2.13's CPU allocator raised for --psi-step 1e-6
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 70560000000 bytes. Error code 12 (Cannot allocate memory)")
        raise MemoryError()

    monkeypatch.setattr(classify_cli, "run", boom)
    monkeypatch.setattr(classify_cli, "device_arg", lambda value: value)  # no GPU needed to parse cuda:0
    assert main(["classify", str(tmp_path / "p.star"), "-o", str(tmp_path / "job"), "--device", "cuda:0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(classify_cli, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["classify", str(tmp_path / "p.star"), "-o", str(tmp_path / "job")])


@pytest.mark.parametrize("command", [
    ["classify", "p.star"], ["stream", "incoming"], ["simulate", "bundled"], ["select", "job"], ["rebalance", "job"],
    ["demo"], ["view", "job"],
])
def test_empty_output_folder_refused(capsys, command):
    """``-o ''`` (a script's empty variable) wrote the job, or 1,000 simulated images, into the current folder."""
    from cryo2d.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([*command, "-o", ""])
    assert exc.value.code == 2
    assert "argument -o/--out: empty (give the folder to write)" in capsys.readouterr().err


def test_job_never_overwrites_its_input(sim3, tmp_path, capsys):
    """A job in the folder of its particles.star (``-o .``) replaced the input with its own particles.star."""
    import shutil

    from cryo2d.cli.main import main

    folder = tmp_path / "data"
    shutil.copytree(sim3.folder, folder)
    before = (folder / "particles.star").read_bytes()
    fast = ["--classes", "2", "--online-iterations", "1", "--batch-per-class", "10"]
    assert main(["classify", str(folder / "particles.star"), "-o", str(folder), *fast]) == 1
    err = capsys.readouterr().err
    assert f"{folder}: the job would write particles.star over its input {folder / 'particles.star'}" in err
    # A stream: its source folder as the job folder, or a growing file in it.
    assert main(["stream", str(folder), "-o", str(folder), *fast, "--until", "1"]) == 1
    assert "the job folder is the folder it watches" in capsys.readouterr().err
    assert main(["stream", str(folder / "particles.star"), "-o", str(folder), *fast, "--until", "1"]) == 1
    assert "the job would write particles.star over its input" in capsys.readouterr().err
    assert (folder / "particles.star").read_bytes() == before and not (folder / "classes.mrcs").exists()
    # Another name in the same folder is no input: the job may sit beside it.
    renamed = folder / "picked.star"
    (folder / "particles.star").rename(renamed)
    assert main(["classify", str(renamed), "-o", str(folder), *fast]) == 0
    assert (folder / "classes.mrcs").is_file() and renamed.read_bytes() == before


def test_out_of_memory_outside_classification_gives_no_classification_advice(tmp_path, capsys, monkeypatch):
    """``simulate --box 100000`` ran out of memory with advice about --classes, which simulate does not have."""
    import cryo2d.cli.simulate as simulate_cli
    from cryo2d.cli.main import main

    def boom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 16000000000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(simulate_cli, "run", boom)
    assert main(["simulate", "bundled", "-o", str(tmp_path / "sim"), "--box", "100000"]) == 1
    assert capsys.readouterr().err == "cryo2d: error: out of memory (RAM: 14,901,161.2 GiB asked for at once).\n"
