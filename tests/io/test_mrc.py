"""MRC stacks: memory-mapped reads of just the requested images, maps, writing."""
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


def test_reads_are_memory_mapped_and_chunked(tmp_path):
    """A 3.3 MB stack: reading 8 images allocates about 8 images, not the stack."""
    images = np.random.default_rng(1).normal(size=(200, 64, 64)).astype(np.float32)
    write_mrcs(tmp_path / "big.mrcs", images)
    stack = MRCStack.from_paths([tmp_path / "big.mrcs"] * 200, np.arange(200))
    stack.read(np.array([0]))  # maps the file
    chunk_bytes = 8 * 64 * 64 * 4
    tracemalloc.start()
    out = stack.read(np.arange(100, 108))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(out, images[100:108])
    assert peak < 4 * chunk_bytes and peak < images.nbytes / 5
    handle = next(iter(stack._handles.values()))
    assert isinstance(handle, mrcfile.mrcmemmap.MrcMemmap) and isinstance(handle.data, np.memmap)
    held = [v for v in vars(stack).values() if isinstance(v, np.ndarray)]
    assert all(v.size <= 200 for v in held)  # only per-particle index arrays


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
