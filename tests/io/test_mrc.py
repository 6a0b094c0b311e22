"""MRC stacks: explicit reads of just the requested images, maps, writing."""
import io
import pickle
import tracemalloc

import mrcfile
import numpy as np
import pytest
from particle_files import shared_data, write_mrcs

import cryo2d.io.mrc as mrc_module
from cryo2d.errors import Cryo2DError
from cryo2d.io.mrc import ArrayStack, MRCStack, check_finite, nonfinite_indices, read_map, write_stack


@pytest.fixture
def two_stacks(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 8, 8)).astype(np.float32)
    b = rng.normal(size=(3, 8, 8)).astype(np.float32)
    write_mrcs(tmp_path / "a.mrcs", a)
    write_mrcs(tmp_path / "b.mrcs", b)
    paths = [tmp_path / "a.mrcs"] * 5 + [tmp_path / "b.mrcs"] * 3
    indices = [0, 1, 2, 3, 4, 0, 1, 2]
    return MRCStack.from_paths(paths, indices, label="p.star"), np.concatenate([a, b])


def test_read_returns_requested_order_across_files(two_stacks):
    stack, images = two_stacks
    assert len(stack) == 8 and stack.box == 8
    idx = np.array([7, 0, 5, 2, 2, 6])
    out = stack.read(idx)
    assert out.dtype == np.float32 and out.shape == (6, 8, 8)
    np.testing.assert_array_equal(out, images[idx])


def test_reads_are_chunked_and_not_mapped(tmp_path):
    """A 3.3 MB stack: reading 8 images allocates about 8 images, not the stack, and maps nothing."""
    images = np.random.default_rng(1).normal(size=(200, 64, 64)).astype(np.float32)
    write_mrcs(tmp_path / "big.mrcs", images)
    stack = MRCStack.from_paths([tmp_path / "big.mrcs"] * 200, np.arange(200))
    stack.read(np.array([0]))  # opens the file
    chunk_bytes = 8 * 64 * 64 * 4
    tracemalloc.start()
    out = stack.read(np.arange(100, 108))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(out, images[100:108])
    assert peak < 4 * chunk_bytes and peak < images.nbytes / 5
    handle = next(iter(stack._handles.values()))
    assert isinstance(handle, io.FileIO) and not handle.closed
    held = [v for v in vars(stack).values() if isinstance(v, np.ndarray)]
    assert not any(isinstance(v, np.memmap) for v in held)
    assert all(v.size <= 200 for v in held)  # only per-particle index arrays


def _write_mode(path, data, byte_order="native", map_id=True):
    """An MRC stack of ``data`` in its own dtype; optionally other-endian or without the map ID."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
    raw = bytearray(path.read_bytes())
    if byte_order == "swapped":  # every header field and pixel in the other byte order
        header = np.frombuffer(bytes(raw[:1024]), dtype=mrcfile.dtypes.HEADER_DTYPE).copy()
        native_stamp = bytes(header["machst"][0])
        swapped = header.byteswap().view(header.dtype.newbyteorder())
        swapped["machst"] = np.frombuffer(b"\x11\x11\x00\x00" if native_stamp[0] == 0x44 else b"\x44\x44\x00\x00", np.uint8)
        swapped["map"] = header["map"]
        swapped["label"] = header["label"]
        raw[:1024] = swapped.tobytes()
        raw[1024:] = np.ascontiguousarray(data).byteswap().tobytes()
    if not map_id:  # an old RELION stack: no "MAP " tag
        raw[208:212] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, np.float16, np.int8])
@pytest.mark.parametrize("variant", ["native", "swapped", "no_map_id", "extended_header"])
def test_reads_match_mrcfile(tmp_path, dtype, variant):
    """Same arrays as ``mrcfile.open(...).data`` for every mode, byte order, image order and file mix."""
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    stacks = []
    for name, n in (("a.mrcs", 7), ("b.mrcs", 4), ("c.mrcs", 1)):
        if info:
            data = rng.integers(info.min, info.max, size=(n, 6, 6), endpoint=True).astype(dtype)
        else:
            data = (rng.normal(size=(n, 6, 6)) * 100).astype(dtype)
        path = tmp_path / name
        if variant == "extended_header":
            with mrcfile.new(path, overwrite=True) as mrc:
                mrc.set_data(data)
                mrc.set_image_stack()
                mrc.set_extended_header(np.arange(37, dtype=np.uint8))  # odd size: unaligned data
        else:
            _write_mode(path, data, byte_order="swapped" if variant == "swapped" else "native",
                        map_id=variant != "no_map_id")
        with mrcfile.open(path, permissive=True) as mrc:
            expected = np.array(mrc.data).reshape(n, 6, 6)  # one image: mrcfile gives 2D
            assert mrc.data.dtype == np.dtype(dtype) or mrc.data.dtype == np.dtype(dtype).newbyteorder()
            if variant == "swapped" and np.dtype(dtype).itemsize > 1:
                assert mrc.data.dtype.byteorder != np.dtype(dtype).newbyteorder("=").byteorder
        np.testing.assert_array_equal(expected, data)
        stacks.append((path, expected))
    paths = [p for p, e in stacks for _ in range(len(e))]
    numbers = [i for _, e in stacks for i in range(len(e))]
    images = np.concatenate([e for _, e in stacks]).astype(np.float32)
    # shuffled particle order: image numbers within a file are not sorted
    perm = rng.permutation(len(paths))
    stack = MRCStack.from_paths([paths[i] for i in perm], np.array(numbers)[perm], label="p.star")
    images = images[perm]
    assert stack._strict == [variant != "no_map_id"] * 3
    for idx in (
        np.arange(len(stack)),                      # all, in order
        rng.permutation(len(stack)),                # unsorted
        np.array([3, 3, 0, 3, 11, 0, 5, 6, 7, 8]),  # repeated indices
        np.array([2]),
        np.array([[1, 2], [4, 3]]),                 # any shape, flattened
    ):
        out = stack.read(idx)
        assert out.dtype == np.float32 and out.shape == (idx.size, 6, 6)
        np.testing.assert_array_equal(out, images[idx.reshape(-1)])
    assert stack.read_unchecked(np.zeros(0, dtype=np.int64)).shape == (0, 6, 6)
    copy = pickle.loads(pickle.dumps(stack))
    np.testing.assert_array_equal(copy.read(np.array([10, 1])), images[[10, 1]])
    stack.close()


def test_consecutive_images_are_read_in_one_call(tmp_path, monkeypatch):
    images = np.random.default_rng(6).normal(size=(20, 4, 4)).astype(np.float32)
    write_mrcs(tmp_path / "s.mrcs", images)
    stack = MRCStack.from_paths([tmp_path / "s.mrcs"] * 20, np.arange(20))
    calls = []
    read_at = mrc_module._read_at

    def counted(handle, view, offset):
        calls.append(offset)
        return read_at(handle, view, offset)

    monkeypatch.setattr(mrc_module, "_read_at", counted)
    idx = np.array([9, 3, 4, 5, 4, 10, 11, 17])  # runs 3-5, 9-11, 17
    np.testing.assert_array_equal(stack.read(idx), images[idx])
    assert calls == [1024 + 3 * 64, 1024 + 9 * 64, 1024 + 17 * 64]


def test_open_file_cache_is_bounded(two_stacks, monkeypatch):
    stack, images = two_stacks
    monkeypatch.setattr(mrc_module, "MAX_OPEN_FILES", 1)
    np.testing.assert_array_equal(stack.read(np.arange(8)), images)
    assert len(stack._handles) == 1


def test_pickles_without_open_handles(two_stacks):
    stack, images = two_stacks
    stack.read(np.array([0]))
    copy = pickle.loads(pickle.dumps(stack))
    np.testing.assert_array_equal(copy.read(np.array([6, 1])), images[[6, 1]])
    stack.close()


def test_single_2d_image_and_integer_modes(tmp_path):
    image = np.arange(36, dtype=np.int16).reshape(6, 6)
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(image)
    stack = MRCStack.from_paths([tmp_path / "one.mrc"], [0])
    np.testing.assert_array_equal(stack.read(np.array([0]))[0], image.astype(np.float32))
    with pytest.raises(Cryo2DError, match=r"image 1 of .*one.mrc is past the end of .*one.mrc \(1 images\)"):
        MRCStack.from_paths([tmp_path / "one.mrc"], [1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_old_relion_stack_without_map_id_loads():
    path = shared_data("particles/cryodrgn_relion31/relion31.mrcs")
    stack = MRCStack.from_paths([path] * 5, np.arange(5))
    with mrcfile.open(path, permissive=True) as mrc:
        np.testing.assert_array_equal(stack.read(np.array([4, 0])), mrc.data[[4, 0]])


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_pixels_found_on_read_and_by_scan(tmp_path):
    images = np.zeros((6, 4, 4), dtype=np.float32)
    images[4, 1, 2] = np.nan
    write_mrcs(tmp_path / "s.mrcs", images)
    stack = MRCStack.from_paths([tmp_path / "s.mrcs"] * 6, np.arange(6), label="p.star", index_base=1)
    stack.read(np.arange(4))
    with pytest.raises(Cryo2DError, match=r"^p.star: image 000005@.*s.mrcs has NaN/Inf pixels$"):
        check_finite(stack, chunk=2)
    np.testing.assert_array_equal(nonfinite_indices(stack, chunk=4), [4])
    assert nonfinite_indices(ArrayStack(images[:4])).size == 0


def test_array_stack():
    images = np.random.default_rng(2).normal(size=(5, 6, 6))
    stack = ArrayStack(images)
    assert len(stack) == 5 and stack.box == 6
    out = stack.read(np.array([3, 1]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, images[[3, 1]], rtol=1e-6)


def test_write_stack_roundtrip(tmp_path):
    images = np.random.default_rng(3).normal(size=(4, 10, 10))
    write_stack(tmp_path / "classes.mrcs", images, 2.5)
    with mrcfile.open(tmp_path / "classes.mrcs") as mrc:
        assert mrc.data.dtype == np.float32 and mrc.is_image_stack()
        np.testing.assert_allclose(mrc.data, images, rtol=1e-6)
        assert mrc.voxel_size.x == pytest.approx(2.5)
    assert [p.name for p in tmp_path.iterdir()] == ["classes.mrcs"]


def test_read_map(tmp_path):
    volume = np.random.default_rng(4).normal(size=(8, 8, 8)).astype(np.float32)
    with mrcfile.new(tmp_path / "map.mrc") as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = 3.0
    got, voxel = read_map(tmp_path / "map.mrc")
    np.testing.assert_array_equal(got, volume)
    assert voxel == 3.0
    with mrcfile.new(tmp_path / "flat.mrc") as mrc:
        mrc.set_data(volume[:4])
    with pytest.raises(Cryo2DError, match="flat.mrc: not a cubic 3D map"):
        read_map(tmp_path / "flat.mrc")


def test_read_real_map():
    volume, voxel = read_map(shared_data("maps/emd_3488.mrc"))
    assert volume.shape == (100, 100, 100) and volume.dtype == np.float32
    assert voxel == pytest.approx(1.05, abs=1e-4)


def test_read_into_a_given_buffer_matches_read(tmp_path):
    rng = np.random.default_rng(5)
    f32 = rng.normal(size=(7, 6, 6)).astype(np.float32)
    i16 = rng.integers(-300, 300, size=(7, 6, 6)).astype(np.int16)
    write_mrcs(tmp_path / "a.mrcs", f32)
    write_mrcs(tmp_path / "b.mrcs", i16)
    # In order from one float32 file (read straight into the buffer), out of order, repeated, two files.
    for files, index, idx in [
        (["a.mrcs"] * 7, np.arange(7), np.arange(2, 6)),
        (["a.mrcs"] * 7, np.arange(7), np.array([5, 1, 1, 3])),
        (["b.mrcs"] * 7, np.arange(7), np.arange(1, 5)),
        (["a.mrcs"] * 3 + ["b.mrcs"] * 4, np.r_[0:3, 0:4], np.arange(1, 5)),
    ]:
        stack = MRCStack.from_paths([tmp_path / f for f in files], index)
        buf = np.full((len(idx), 6, 6), np.nan, dtype=np.float32)
        got = stack.read_unchecked(idx, out=buf)
        assert got is buf
        np.testing.assert_array_equal(buf, stack.read(idx))
    np.testing.assert_array_equal(MRCStack.from_paths([tmp_path / "a.mrcs"] * 7, np.arange(7)).read(np.arange(2, 6)), f32[2:6])


def test_open_files_are_bounded_over_all_stacks(tmp_path, monkeypatch):
    """Many stacks (a stream's one set per micrograph file) share one bound on open files: 1,100 such
    stacks once held 1,100 descriptors, past Linux's default limit of 1,024 ("Too many open files")."""
    monkeypatch.setattr(mrc_module, "MAX_OPEN_FILES_TOTAL", 4)
    monkeypatch.setattr(mrc_module, "_open_files", type(mrc_module._open_files)())
    stacks = []
    for i in range(10):
        write_mrcs(tmp_path / f"m{i}.mrcs", np.full((2, 8, 8), i, dtype=np.float32))
        stacks.append(MRCStack([tmp_path / f"m{i}.mrcs"], np.array([0, 0]), np.array([1, 0])))
    for _ in range(2):
        for i, stack in enumerate(stacks):
            np.testing.assert_array_equal(stack.read(np.array([0, 1]))[:, 0, 0], [i, i])
            assert sum(len(s._handles) for s in stacks) <= 4
    # The most recently read stacks keep theirs; a closed one reopens on its next read.
    assert [len(s._handles) for s in stacks] == [0] * 6 + [1] * 4
    assert stacks[0].read(np.array([1]))[0, 0, 0] == 0
    assert len(stacks[0]._handles) == 1 and sum(len(s._handles) for s in stacks) == 4


def test_a_stack_being_read_keeps_its_files(tmp_path, monkeypatch):
    """Another stack's files are closed only when its lock is free (not mid-read in another thread)."""
    monkeypatch.setattr(mrc_module, "MAX_OPEN_FILES_TOTAL", 1)
    monkeypatch.setattr(mrc_module, "_open_files", type(mrc_module._open_files)())
    for name in ("a", "b"):
        write_mrcs(tmp_path / f"{name}.mrcs", np.ones((1, 8, 8), dtype=np.float32))
    a = MRCStack([tmp_path / "a.mrcs"], np.array([0]), np.array([0]))
    b = MRCStack([tmp_path / "b.mrcs"], np.array([0]), np.array([0]))
    a.read(np.array([0]))
    with a._lock:  # as if a read of a were under way
        b.read(np.array([0]))
    assert len(a._handles) == 1 and len(b._handles) == 1
    a.read(np.array([0]))  # b is free: its file is closed
    assert len(a._handles) == 1 and len(b._handles) == 0
