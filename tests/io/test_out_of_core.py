"""Out of core: a stack larger than the memory a process may use is read in chunks (issue 7 item 3).

The stack (~200 MiB of float32) is read in a subprocess whose heap is
limited with ``RLIMIT_DATA`` to its size after imports plus ``HEAP_LIMIT``
(48 MiB, a quarter of the stack). ``RLIMIT_DATA`` counts private writable
memory (malloc, numpy buffers) but not read-only file mappings, so the
memory-mapped stack may be as large as it likes while any copy of it in
memory fails with ``MemoryError``; the test checks that it does (a control
read of every image at once). The chunked reads must give the same bytes as
were written (SHA-256), through both ``.star`` and ``.cs`` metadata.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pytest

N_IMAGES, BOX = 800, 256  # 800 x 256^2 x 4 bytes = 200 MiB
CHUNK = 64  # images per read: 16 MiB
HEAP_LIMIT = 48 * 2**20  # bytes the reading process's heap may grow by

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_DATA semantics are Linux's")


def _write_stack(folder: Path) -> tuple[Path, str]:
    """A (N_IMAGES, BOX, BOX) float32 stack written chunk by chunk; returns (path, SHA-256 of its data)."""
    path = folder / "big.mrcs"
    digest = hashlib.sha256()
    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(path, shape=(N_IMAGES, BOX, BOX), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 1.5
        for start in range(0, N_IMAGES, CHUNK):
            images = rng.standard_normal((min(CHUNK, N_IMAGES - start), BOX, BOX), dtype=np.float32)
            mrc.data[start:start + len(images)] = images
            digest.update(images.tobytes())
    return path, digest.hexdigest()


def _write_metadata(folder: Path) -> tuple[Path, Path]:
    star = folder / "big.star"
    star.write_text(
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnImagePixelSize #2\n"
        + "".join(f"{i + 1:06d}@big.mrcs 1.5\n" for i in range(N_IMAGES))
    )
    array = np.zeros(N_IMAGES, dtype=[("blob/path", "S8"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    array["blob/path"] = b"big.mrcs"
    array["blob/idx"] = np.arange(N_IMAGES)
    array["blob/psize_A"] = 1.5
    cs = folder / "big.cs"
    with open(cs, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return star, cs


READER = textwrap.dedent("""
    import hashlib, json, resource, sys, tracemalloc
    import numpy as np
    from cryo2d.io import check_finite, read_particles

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

    files, chunk, heap_limit = json.loads(sys.argv[1])
    data_bytes = status("VmData")
    resource.setrlimit(resource.RLIMIT_DATA, (data_bytes + heap_limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    anon_start = status("RssAnon")
    anon_peak = anon_start
    tracemalloc.start()
    report = {"digests": [], "n_images": []}
    for path in files:
        stack = read_particles(path, no_ctf=True, project_dir=None).stack
        digest = hashlib.sha256()
        for start in range(0, len(stack), chunk):
            images = stack.read(np.arange(start, min(start + chunk, len(stack))))
            digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))
            anon_peak = max(anon_peak, status("RssAnon"))
            del images
        check_finite(stack, chunk=chunk)
        report["digests"].append(digest.hexdigest())
        report["n_images"].append(len(stack))
        stack.close()
    report["traced_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    report["anon_growth"] = anon_peak - anon_start
    try:  # the control: every image at once is more than the limit allows
        read_particles(files[0], no_ctf=True).stack.read(np.arange(len(stack)))
        report["control"] = "read"
    except MemoryError:
        report["control"] = "MemoryError"
    print(json.dumps(report))
""")


def test_stack_larger_than_memory_limit_reads_in_chunks(tmp_path):
    stack, expected = _write_stack(tmp_path)
    stack_bytes = stack.stat().st_size
    assert stack_bytes > 4 * HEAP_LIMIT
    star, cs = _write_metadata(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", READER, json.dumps([[str(star), str(cs)], CHUNK, HEAP_LIMIT])],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["n_images"] == [N_IMAGES, N_IMAGES]
    assert report["digests"] == [expected, expected]
    chunk_bytes = CHUNK * BOX * BOX * 4
    # Python/numpy allocations: a chunk and its float32 copy, not the stack.
    assert report["traced_peak"] < 3 * chunk_bytes < stack_bytes / 4, report
    assert report["anon_growth"] < 3 * chunk_bytes, report
    assert report["control"] == "MemoryError", "the memory limit did not bind: the test proves nothing"
