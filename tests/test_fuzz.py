"""Hostile input: random and mangled MRC, STAR and .cs files (DESIGN §5, issue 7 item 4).

Every example must end in a clean read or in a one-line ``Cryo2DError`` that
starts with the file's name. Anything else fails the test: another exception
type, a hang (``SIGALRM`` after ``HANG_S`` seconds, besides hypothesis's own
deadline), or an allocation above ``MEMORY_LIMIT`` (the ``tracemalloc`` peak:
numpy reports its buffers to it, and ``mrcfile`` allocates extended headers
as ``bytearray``). Headers declaring huge sizes are also read in a
subprocess under ``RLIMIT_DATA``, which catches allocations at any level.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import mrcfile
import mrcfile.dtypes
import numpy as np
import numpy.lib.recfunctions
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="fuzz tests need hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "io"))
from particle_files import make_cs_dataset, run_cli, write_mrcs  # noqa: E402

from cryo2d.errors import Cryo2DError  # noqa: E402
from cryo2d.io import check_finite, read_map, read_particles  # noqa: E402

HANG_S = 5.0
MEMORY_LIMIT = 32 * 2**20  # bytes; every file here is < 64 KiB
# CRYO2D_FUZZ_EXAMPLES=2000 for a long hunt; 60 keeps the file under a minute.
FUZZ = settings(
    # The hang check is SIGALRM at HANG_S; a shorter deadline failed examples on a loaded machine.
    max_examples=int(os.environ.get("CRYO2D_FUZZ_EXAMPLES", "60")), deadline=HANG_S * 1000, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INT32 = st.integers(-(2**31), 2**31 - 1)


class Hang(BaseException):
    """Raised by SIGALRM; a BaseException so that no reader's ``except Exception`` swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(read, label: Path):
    """``read()``'s result, or the Cryo2DError it raised; anything else fails.

    Checks the error is one line starting with ``label``, that no more than
    ``MEMORY_LIMIT`` bytes were allocated and that it took less than ``HANG_S``.
    """
    tracemalloc.start()
    try:
        with time_limit(HANG_S):
            result = read()
    except Cryo2DError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(f"{label}: "), message
        result = err
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB allocated reading {label}"
    return result


def read_all(path: Path, **kwargs):
    """Open the particle file and its stacks, then read every image."""
    particles = read_particles(path, **kwargs)
    check_finite(particles.stack, chunk=7)
    return particles


# ---------------------------------------------------------------------------
# A valid data set to mangle (module scope: hypothesis reuses it).

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """make_cs_dataset's files (particles.star 3.1, J5/particles.cs, two stacks) plus a 3.0 STAR."""
    folder = tmp_path_factory.mktemp("fuzz")
    star, cs, images, _ = make_cs_dataset(folder)
    star30 = folder / "particles30.star"
    star30.write_text(
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n_rlnDefocusAngle #4\n"
        "_rlnVoltage #5\n_rlnSphericalAberration #6\n_rlnAmplitudeContrast #7\n_rlnDetectorPixelSize #8\n"
        "_rlnMagnification #9\n"
        + "".join(f"{i + 1:06d}@stack0.mrcs 12000.5 11800.25 33.0 300 2.7 0.1 5.0 25000\n" for i in range(6))
    )
    # A one-image stack list for the MRC fuzz: fuzz.mrcs is rewritten by each example.
    (folder / "mrc.star").write_text("data_particles\nloop_\n_rlnImageName\n_rlnImagePixelSize\n000001@fuzz.mrcs 1.5\n")
    write_mrcs(folder / "valid.mrcs", images[:3])
    assert read_particles(star).stack.read([0]).shape == (1, 16, 16)
    return _Files({
        "folder": folder, "star": star, "star30": star30, "cs": cs,
        "star_text": star.read_text(), "star30_text": star30.read_text(),
        "cs_array": np.load(cs, allow_pickle=False), "cs_bytes": cs.read_bytes(),
        "mrc_bytes": (folder / "valid.mrcs").read_bytes(),
    })


class _Files(dict):
    """The base data set; a short repr keeps hypothesis's failure reports readable."""

    def __repr__(self) -> str:
        return f"<fuzz files in {self['folder']}>"


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return path


# ---------------------------------------------------------------------------
# MRC stacks: random bytes, mutated headers, truncated data.

def check_mrc(base, content: bytes) -> None:
    stack = write(base["folder"] / "fuzz.mrcs", content)
    star = base["folder"] / "mrc.star"
    particles = outcome(lambda: read_all(star, no_ctf=True), star)
    if not isinstance(particles, Cryo2DError):  # a clean read: the file holds what its header declares
        assert len(stack.read_bytes()) >= 1024 + particles.box**2
    outcome(lambda: read_map(stack), stack)


def header_of(content: bytes) -> np.ndarray:
    return np.frombuffer(content[:1024], dtype=mrcfile.dtypes.HEADER_DTYPE).copy()


DIMS = st.sampled_from([0, 1, 3, 16, -1, -16, 2**15, 2**30, 2**31 - 1, -(2**31)]) | INT32
MODES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 12, 101, 255, -1, 2**24, 2**31 - 1]) | INT32
HEADER_FIELDS = {
    "nx": DIMS, "ny": DIMS, "nz": DIMS, "mz": DIMS, "mode": MODES,
    "nsymbt": st.sampled_from([0, 4, 1024, 2**20, -1, 2**31 - 1]) | INT32,
    "ispg": st.sampled_from([0, 1, 401, 630, -1]) | INT32,
    "machst": st.sampled_from([b"DA\0\0", b"DD\0\0", b"\x11\x11\0\0", b"\0\0\0\0"]) | st.binary(min_size=4, max_size=4),
    "map": st.sampled_from([b"MAP ", b"MAP\0", b"\0\0\0\0"]) | st.binary(min_size=4, max_size=4),
}


@st.composite
def mutated_mrc(draw, valid: bytes) -> bytes:
    """The valid stack with some header fields replaced, then cut or padded."""
    header = header_of(valid)
    for field, values in HEADER_FIELDS.items():
        if draw(st.booleans()):
            value = draw(values)
            header[field] = np.frombuffer(value, dtype="u1") if field == "machst" else value
    body = valid[1024:] + draw(st.binary(max_size=64))
    return header.tobytes() + body[: draw(st.integers(0, len(body)))]


@FUZZ
@given(data=st.data())
def test_mrc_mutated_headers(base, data):
    check_mrc(base, data.draw(mutated_mrc(base["mrc_bytes"])))


@FUZZ
@given(content=st.binary(max_size=2048) | st.binary(min_size=1024, max_size=1200))
def test_mrc_random_bytes(base, content):
    check_mrc(base, content)


@FUZZ
@given(data=st.data())
def test_mrc_truncated_data(base, data):
    """A valid header with its data cut anywhere: refused unless every byte is there."""
    valid = base["mrc_bytes"]
    cut = data.draw(st.integers(0, len(valid)))
    write(base["folder"] / "fuzz.mrcs", valid[:cut])
    star = base["folder"] / "mrc.star"
    particles = outcome(lambda: read_all(star, no_ctf=True), star)
    assert isinstance(particles, Cryo2DError) == (cut < len(valid))


@pytest.mark.parametrize("mode, readable", [
    (0, True), (1, True), (2, True), (6, True), (12, True),  # int8, int16, float32, uint16, float16
    (3, False), (4, False),  # complex int16, complex float32
    (101, False), (5, False), (77, False), (-1, False),  # 4-bit packed and unknown modes
])
def test_mrc_modes(base, mode, readable):
    """Each mode with a file of exactly the size it implies: real modes read, the rest refused."""
    itemsize = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}.get(mode, 4)
    valid = base["mrc_bytes"]
    header = header_of(valid)
    header["mode"] = mode
    n, box = 3, 16
    write(base["folder"] / "fuzz.mrcs", header.tobytes() + bytes(n * box * box * itemsize))
    star = base["folder"] / "mrc.star"
    particles = outcome(lambda: read_all(star, no_ctf=True), star)
    assert isinstance(particles, Cryo2DError) != readable, particles
    if readable:
        assert (particles.stack.read([0]) == 0).all()


# ---------------------------------------------------------------------------
# Huge declared sizes: refused from the header alone, fast, in a memory-limited process.

def _huge_mrc(valid: bytes, **fields) -> bytes:
    header = header_of(valid)
    for field, value in fields.items():
        header[field] = value
    return header.tobytes() + valid[1024:]


def _huge_npy(array: np.ndarray, shape: tuple) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": shape}
    )
    return out.getvalue() + array.tobytes()


HUGE_MRC = {
    "cube_2^30": dict(nx=2**30, ny=2**30, nz=2**30),  # 4 EiB: np.prod wraps this to 0 bytes
    "cube_int32_max": dict(nx=2**31 - 1, ny=2**31 - 1, nz=2**31 - 1),
    "images_2^30": dict(nz=2**30),
    "box_2^15": dict(nx=2**15, ny=2**15),
    "extended_header_2GiB": dict(nsymbt=2**31 - 1),  # mrcfile allocates it before noticing the file is short
    # Stamp says big-endian, data are little-endian: the strict reader would take nsymbt = 2 as 32 MiB.
    "wrong_stamp_extended_header": dict(machst=[0x11, 0x11, 0, 0], nsymbt=2),
}
HUGE_NPY = {"rows_2^40": (2**40,), "rows_2^62": (2**62,), "rows_3e7": (30_000_000,), "cube_2^31": (2**31,) * 3}


@pytest.fixture(scope="module")
def huge_files(base):
    folder = base["folder"] / "huge"
    folder.mkdir()
    files = []
    for name, fields in HUGE_MRC.items():
        write(folder / f"{name}.mrcs", _huge_mrc(base["mrc_bytes"], **fields))
        star = write(folder / f"{name}.star", f"data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n000001@{name}.mrcs 1\n")
        files += [("particles", star), ("map", folder / f"{name}.mrcs")]
    for name, shape in HUGE_NPY.items():
        files.append(("particles", write(folder / f"{name}.cs", _huge_npy(base["cs_array"], shape))))
    return files


def test_huge_declared_sizes_fail_fast(huge_files):
    for kind, path in huge_files:
        start = time.perf_counter()
        read = (lambda: read_map(path)) if kind == "map" else (lambda: read_all(path, no_ctf=True))
        assert isinstance(outcome(read, path), Cryo2DError)
        assert time.perf_counter() - start < 1.0, path


@pytest.mark.skipif(not hasattr(signal, "SIGALRM") or sys.platform != "linux", reason="needs Linux RLIMIT_DATA")
def test_huge_declared_sizes_under_memory_limit(huge_files):
    """Each huge file again, in a process whose heap may grow by only 256 MiB past its imports."""
    script = textwrap.dedent("""
        import json, resource, sys
        from cryo2d.errors import Cryo2DError
        from cryo2d.io import read_map, read_particles
        data_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmData"))
        limit = data_kib * 1024 + 256 * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        results = []
        for kind, path in json.loads(sys.argv[1]):
            try:
                read_map(path) if kind == "map" else read_particles(path, no_ctf=True)
                results.append("read")
            except Cryo2DError as err:
                results.append("Cryo2DError")
            except BaseException as err:
                results.append(type(err).__name__ + ": " + str(err)[:200])
        print(json.dumps(results))
    """)
    files = [(kind, str(path)) for kind, path in huge_files]
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(files)], capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == ["Cryo2DError"] * len(files)


# ---------------------------------------------------------------------------
# STAR files: mangled text, random text, binary garbage.

STAR_TOKENS = st.sampled_from([
    "", "abc", "nan", "inf", "-inf", "-1", "0", "1", "2", "3", "1e300", "-1e300", "1.5", "@",
    "0@stack0.mrcs", "-3@stack0.mrcs", "000007@stack0.mrcs", "999999@stack0.mrcs", "1.5@stack0.mrcs",
    "99999999999999999999999@stack0.mrcs", "stack0.mrcs", "000001@missing.mrcs", "000001@",
    "000001@particles.star", "000001@J5", "000001@" + "a" * 300, "\x00", "\r", "é", "'", '"', "#",
    "loop_", "data_", "data_optics", "data_particles", "_rlnImageName", "_rlnFoo", "_rlnOpticsGroup",
    "_rlnImageSize", "_rlnVoltage",
]) | st.text(max_size=12)


@st.composite
def mangled_star(draw, text: str) -> str:
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["delete", "duplicate", "token", "token", "token", "insert", "cut"]))
        if not lines:
            lines = [draw(STAR_TOKENS)]
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "token":
            tokens = lines[i].split() or [""]
            tokens[draw(st.integers(0, len(tokens) - 1))] = draw(STAR_TOKENS)
            lines[i] = "\t".join(tokens)
        elif op == "insert":
            lines.insert(i, draw(STAR_TOKENS))
        else:
            lines = lines[:i]
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


def check_star(base, content: bytes | str) -> None:
    star = write(base["folder"] / "fuzz.star", content)
    outcome(lambda: read_all(star), star)
    outcome(lambda: read_particles(star, no_ctf=True, open_stacks=False), star)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["star_text", "star30_text"]))
def test_star_mangled(base, data, which):
    check_star(base, data.draw(mangled_star(base[which])))


@FUZZ
@given(content=st.binary(max_size=1024) | st.text(max_size=400))
def test_star_random(base, content):
    check_star(base, content)


def _replace(old: str, new: str, count: int = -1):
    def change(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)
    return change


OPTICS_ROW2 = "opticsGroup2\t2\t200.000000\t2.700000\t0.070000\t2.000000\t16\t2"
STAR_CASES = {
    "blank": (lambda t: "", "no data block with an _rlnImageName column"),
    "binary garbage": (lambda t: bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 on line 2)"),
    "no loop_": (_replace("loop_\n", ""), "non-numeric value"),
    "column renamed": (_replace("_rlnImageName", "_rlnImageFile"), "no data block with an _rlnImageName column"),
    "duplicate column": (_replace("_rlnDefocusV #5", "_rlnDefocusU #5"), "data_particles has column _rlnDefocusU more than once"),
    "row without image name": (_replace("000001@stack1.mrcs", "nan"), "particle 1 has no _rlnImageName"),
    "ctf column missing": (_replace("_rlnDefocusU #4", "_rlnDefocusX #4"), "column _rlnDefocusU missing"),
    "extra column header": (_replace("_rlnOpticsGroup #9", "_rlnOpticsGroup #9\n_rlnFoo #10"), "not a readable STAR file"),
    "non-numeric defocus": (lambda t: re.sub(r"(@stack\d\.mrcs\tmic\d\.mrc\t)[0-9.]+", r"\g<1>12k", t, count=1),
                            "column _rlnDefocusU has a non-numeric value ('12k')"),
    "non-numeric voltage": (_replace("\t300.000000\t", "\tthree_hundred\t"), "column _rlnVoltage has a non-numeric value"),
    "zero index": (_replace("000001@stack1.mrcs", "000000@stack1.mrcs"), "bad _rlnImageName '000000@stack1.mrcs'"),
    "negative index": (_replace("000001@stack1.mrcs", "-1@stack1.mrcs"), "bad _rlnImageName '-1@stack1.mrcs'"),
    "fractional index": (_replace("000001@stack1.mrcs", "1.5@stack1.mrcs"), "bad _rlnImageName"),
    "huge index": (_replace("000001@stack1.mrcs", "99999999999999999999999@stack1.mrcs"), "bad _rlnImageName"),
    "index past the end": (_replace("000001@stack1.mrcs", "000007@stack1.mrcs"), "is past the end of stack1.mrcs"),
    "name without @": (_replace("000001@stack1.mrcs", "stack1.mrcs"), None),  # image 1 of stack1.mrcs: valid
    "only @": (_replace("000001@stack1.mrcs", "@"), "bad _rlnImageName '@'"),
    "control character in name": (_replace("000001@stack1.mrcs", "000001@stack\x011.mrcs"), "bad _rlnImageName"),
    "name too long for the OS": (_replace("000001@stack1.mrcs", "000001@" + "s" * 5000), "not found"),
    "stack is a folder": (_replace("000001@stack1.mrcs", "000001@J5"), "not found"),
    "stack is the STAR file": (_replace("000001@stack1.mrcs", "000001@particles.star"), "not an MRC file"),
    "optics group not defined": (_replace("\t2\n", "\t3\n"), "optics group 3, which data_optics does not define"),
    "optics group text": (_replace("\t2\n", "\ttwo\n"), "which data_optics does not define"),
    "optics group defined twice": (_replace(OPTICS_ROW2, OPTICS_ROW2.replace("\t2\t", "\t1\t", 1)), "more than once"),
    "optics without group column": (_replace("_rlnOpticsGroup #2", "_rlnOpticsGroupX #2"), "data_optics has no _rlnOpticsGroup"),
    "image size text": (_replace("\t16\t2", "\tsixteen\t2"), "_rlnImageSize 'sixteen' is not a box size"),
    "image size infinite": (_replace("\t16\t2", "\tinf\t2"), "is not a box size"),
    "image size huge": (_replace("\t16\t2", "\t1e300\t2"), "is not a box size"),
    "optics block only": (lambda t: t.split("data_particles")[0], "no data block with an _rlnImageName column"),
    "unclosed quote": (_replace("000001@stack1.mrcs", "'000001@stack1.mrcs"), None),
    "crlf line ends": (lambda t: t.replace("\n", "\r\n"), None),
}


@pytest.mark.parametrize("case", list(STAR_CASES))
def test_star_cases(base, case):
    """The named mangled STAR files of the issue: a Cryo2DError saying what is wrong (None: any outcome)."""
    change, expected = STAR_CASES[case]
    star = write(base["folder"] / "fuzz.star", change(base["star_text"]))
    result = outcome(lambda: read_all(star), star)
    if expected is not None:
        assert isinstance(result, Cryo2DError), f"{case}: read without error"
        assert expected in str(result), str(result)


# ---------------------------------------------------------------------------
# CryoSPARC .cs files: wrong field types, missing fields, bad values, raw byte damage, pickles.

CS_DTYPES = st.sampled_from([
    "S4", "S20", "<U8", "<f8", "<f4", ">f4", "<i8", "<u8", "|i1", "<c8", "?", "V4", "<M8[s]", "<m8[s]",
    ("<u4", (2,)), ("<f4", (3,)), [("a", "<i4")], [("a", "<f4"), ("b", "S2")],
])
CS_VALUES = st.sampled_from([0, 1, -1, 5, 2**31, 2**40, 1.5, float("nan"), float("inf"), -0.0]) | st.binary(max_size=8)


def _retype(array: np.ndarray, field: str, dtype, value) -> np.ndarray:
    """``array`` with ``field`` of type ``dtype``, set to ``value`` (or the old values where castable)."""
    spec = [(n, array.dtype.fields[n][0]) if n != field else (n, *dtype) if isinstance(dtype, tuple)
            else (n, dtype) for n in array.dtype.names]
    out = np.zeros(len(array), dtype=spec)
    for n in array.dtype.names:
        if n == field:
            with contextlib.suppress(Exception):
                out[n] = array[n] if value is None else value
        else:
            out[n] = array[n]
    return out


@st.composite
def mangled_cs(draw, array: np.ndarray) -> bytes:
    names = list(array.dtype.names)
    important = ["blob/path", "blob/idx", "blob/psize_A", "blob/shape", "blob/sign", "ctf/df1_A", "ctf/accel_kv",
                 "ctf/amp_contrast", "ctf/df_angle_rad", "ctf/phase_shift_rad"]
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(important) | st.sampled_from(names))
        if field not in array.dtype.names:
            continue
        op = draw(st.sampled_from(["drop", "retype", "value"]))
        if op == "drop":
            array = np.lib.recfunctions.repack_fields(array[[n for n in array.dtype.names if n != field]])
        elif op == "retype":
            array = _retype(array, field, draw(CS_DTYPES), None if draw(st.booleans()) else draw(CS_VALUES))
        else:
            rows = draw(st.sampled_from([slice(None), slice(0, 1), slice(-1, None)]))
            with contextlib.suppress(Exception):
                array = array.copy()
                array[field][rows] = draw(CS_VALUES)
    if draw(st.booleans()):
        array = array[: draw(st.integers(0, len(array)))]
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def check_cs(base, content: bytes) -> None:
    cs = write(base["folder"] / "J5" / "fuzz.cs", content)
    outcome(lambda: read_all(cs), cs)
    outcome(lambda: read_particles(cs, no_ctf=True, open_stacks=False), cs)


@FUZZ
@given(data=st.data())
def test_cs_mangled_fields(base, data):
    check_cs(base, data.draw(mangled_cs(base["cs_array"])))


@FUZZ
@given(data=st.data())
def test_cs_damaged_bytes(base, data):
    """The valid file with a few bytes overwritten (header included) and maybe cut short."""
    content = bytearray(base["cs_bytes"])
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, len(content) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=8))
        content[at:at + len(patch)] = patch
    check_cs(base, bytes(content[: data.draw(st.integers(0, len(content)))]))


@FUZZ
@given(
    shape=st.lists(st.sampled_from([0, 1, 12, 13, 2**20, 2**40, 2**62, 2**63 - 1]) | st.integers(-(2**63), 2**64), max_size=3),
    descr=st.sampled_from(["base", "<f4", "|S4", "|O"]),
)
def test_cs_header_shapes(base, shape, descr):
    """.npy headers declaring any shape (and dtype) over the same 12 rows of data."""
    array = base["cs_array"]
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype) if descr == "base" else descr,
              "fortran_order": False, "shape": tuple(shape)}
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    check_cs(base, out.getvalue() + array.tobytes())


@FUZZ
@given(content=st.binary(max_size=1024) | st.binary(min_size=6, max_size=300).map(lambda b: b"\x93NUMPY" + b))
def test_cs_random_bytes(base, content):
    check_cs(base, content)


class _Trap:
    """Unpickling this touches ``path``: proof that a reader ran pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_cs_pickles_are_never_loaded(base):
    """Object arrays (.npy with pickled payload) and plain pickles are refused without unpickling."""
    folder = base["folder"] / "J5"
    marker = folder / "unpickled"
    objects = np.array([_Trap(marker)] * 3, dtype=object)
    structured = np.zeros(3, dtype=[("blob/path", object), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    structured["blob/path"] = [_Trap(marker)] * 3
    payloads = {}
    for name, value in {"objects": objects, "structured": structured}.items():
        out = io.BytesIO()
        np.save(out, value, allow_pickle=True)
        payloads[name] = out.getvalue()
    payloads["pickle"] = pickle.dumps(_Trap(marker))
    payloads["pickled array"] = pickle.dumps(base["cs_array"])
    for name, content in payloads.items():
        cs = write(folder / "pickled.cs", content)
        assert isinstance(outcome(lambda: read_particles(cs), cs), Cryo2DError), name
        assert not marker.exists(), f"{name}: the reader unpickled the file"


@pytest.mark.parametrize("field, dtype, value, expected", [
    ("blob/idx", "S4", b"abc", "field blob/idx has type |S4"),
    ("blob/idx", "<f8", float("nan"), "blob/idx nan of particle 1 is not an image number"),
    ("blob/idx", "<f8", 1.5, "is not an image number"),
    ("blob/idx", "<u8", 2**64 - 1, "blob/idx 18446744073709551615 of particle 1 is not an image number"),
    ("blob/idx", "<i4", -1, "blob/idx -1 of particle 1 is not an image number"),
    ("blob/idx", ("<u4", (2,)), 1, "field blob/idx has type <u4(2,)"),
    ("blob/idx", "<c8", 1, "field blob/idx has type <c8"),
    ("blob/path", "<i4", 3, "field blob/path has type <i4"),
    ("blob/path", ("S20", (2,)), b"stack0.mrcs", "field blob/path has type |S20(2,)"),
    ("blob/path", "S20", b"stack\n0.mrcs", "bad blob/path 'stack\\n0.mrcs'"),
    ("blob/path", "S20", b"", "bad blob/path ''"),
    ("blob/path", "S20", b"\xff\xfe", "not found"),
    ("blob/psize_A", "S4", b"1.0", "field blob/psize_A has type |S4"),
    ("blob/psize_A", ("<f4", (3,)), 1.0, "field blob/psize_A has type <f4(3,)"),
    ("blob/psize_A", "<c8", 1.0, "field blob/psize_A has type <c8"),
    ("blob/psize_A", [("a", "<f4")], None, "field blob/psize_A has type |V4"),
    ("blob/psize_A", "<f4", 0.0, "pixel size of particle 1 is 0.0"),
    ("ctf/df1_A", "<M8[s]", 0, "field ctf/df1_A has type <M8[s]"),
    ("ctf/df1_A", ("<f4", (2,)), 1.0, "field ctf/df1_A has type <f4(2,)"),
    ("ctf/df1_A", "<f4", float("inf"), "defocus_u_angst of particle 1 is inf"),
    ("blob/sign", "S4", b"-1", "field blob/sign has type |S4"),
    ("blob/shape", "<f4", float("nan"), None),  # only a hint: the stack's header decides
])
def test_cs_field_cases(base, field, dtype, value, expected):
    cs = write(base["folder"] / "J5" / "fuzz.cs", b"")
    with open(cs, "wb") as handle:
        np.save(handle, _retype(base["cs_array"], field, dtype, value), allow_pickle=False)
    result = outcome(lambda: read_all(cs), cs)
    if expected is None:
        assert not isinstance(result, Cryo2DError), result
    else:
        assert isinstance(result, Cryo2DError) and expected in str(result), result


@pytest.mark.parametrize("case, content, expected", [
    ("empty file", b"", "not a CryoSPARC .cs file"),
    ("not structured", None, "expected a 1-D structured array"),
    ("2-D", None, "expected a 1-D structured array"),
    ("npz archive", None, "a .npz archive"),
    ("truncated", None, "its header declares more data than the file holds"),
    ("no particles", None, "no particles"),
])
def test_cs_file_cases(base, case, content, expected):
    array = base["cs_array"]
    out = io.BytesIO()
    if case == "not structured":
        np.save(out, np.zeros(12))
    elif case == "2-D":
        np.save(out, np.stack([array, array]))
    elif case == "npz archive":
        np.savez(out, particles=array)
    elif case == "truncated":
        out.write(base["cs_bytes"][:-10])
    elif case == "no particles":
        np.save(out, array[:0])
    cs = write(base["folder"] / "J5" / "fuzz.cs", out.getvalue() if content is None else content)
    result = outcome(lambda: read_all(cs), cs)
    assert isinstance(result, Cryo2DError) and expected in str(result), result


# ---------------------------------------------------------------------------
# The CLI on a few of these: exit 1, one stderr line, no traceback.

def test_cli_info_on_hostile_files(base, huge_files, monkeypatch, capsys):
    folder = base["folder"] / "cli"
    folder.mkdir()
    for name in ("stack0.mrcs", "stack1.mrcs"):
        (folder / name).write_bytes((base["folder"] / name).read_bytes())
    bad_header = _huge_mrc(base["mrc_bytes"], nx=2**30, ny=2**30, nz=2**30)
    files = [
        write(folder / "garbage.star", bytes(range(256)) * 8),
        write(folder / "blank.star", ""),
        write(folder / "groups.star", base["star_text"].replace("\t2\n", "\t5\n")),
        write(folder / "index.star", base["star_text"].replace("000001@stack1.mrcs", "000000@stack1.mrcs")),
        write(folder / "image_size.star", base["star_text"].replace("\t16\t2", "\tabc\t2")),
        write(folder / "garbage.cs", bytes(range(256)) * 8),
        write(folder / "huge.cs", _huge_npy(base["cs_array"], (2**40,))),
        write(folder / "pickle.cs", pickle.dumps(base["cs_array"])),
        write(folder / "random.mrcs", os.urandom(1500)),
        *(path for kind, path in huge_files if kind == "particles"),
    ]
    bad_star = write(folder / "huge_stack.star", "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n000001@cube.mrcs 1\n")
    write(folder / "cube.mrcs", bad_header)
    for path in [*files, bad_star]:
        with time_limit(HANG_S):
            code, _, err = run_cli(monkeypatch, capsys, "info", path, "--no-ctf")
        assert code == 1, path
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"cryo2d: error: {path}: "), err
