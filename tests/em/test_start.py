"""The starting classes: binary splitting (cryo2d.em.start) against random subsets."""
from __future__ import annotations

import numpy as np
import pytest

from cryo2d.em.config import EMConfig
from cryo2d.em.start import split_labels, stage_sizes
from cryo2d.errors import Cryo2DError


@pytest.mark.parametrize("k, sizes", [(1, []), (2, [1]), (3, [1, 2]), (12, [1, 2, 4, 8]), (16, [1, 2, 4, 8]),
                                      (20, [1, 2, 4, 8, 16]), (50, [1, 2, 4, 8, 16, 32])])
def test_stage_sizes_double_up_to_below_k(k, sizes):
    assert stage_sizes(k) == sizes


def test_split_labels_by_hand():
    """The largest group splits first, its worse-fitting half (lower fit z) taking the next number."""
    labels = np.array([5, 5, 5, 5, 7, 7])
    z = np.array([0.1, -2.0, 3.0, -1.0, 0.0, 1.0])
    # groups: {0, 1, 2, 3} -> 0, {4, 5} -> 1; group 0's worse half is particles 1 and 3
    np.testing.assert_array_equal(split_labels(labels, z, 2), [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(split_labels(labels, z, 3), [0, 2, 0, 2, 1, 1])
    # then three groups of two: the first (0: particles 0, 2) splits, particle 0 fits worse
    np.testing.assert_array_equal(split_labels(labels, z, 4), [3, 2, 0, 2, 1, 1])
    # a group of one is never split: six groups of one particle each at most
    out = split_labels(labels, z, 6)
    assert sorted(out.tolist()) == list(range(6))
    with pytest.raises(ValueError):
        split_labels(labels, z, 7)


def test_split_labels_seeds_first():
    """Seeds (a class's misfits) become groups of their own before any class is halved."""
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    z = np.array([5.0, 4.0, 3.0, 2.0, -4.0, -5.0, 0.0, 1.0])
    np.testing.assert_array_equal(split_labels(labels, z, 3, [np.array([4, 5])]), [0, 0, 0, 0, 2, 2, 1, 1])
    # more seeds than groups wanted: the first ones only
    np.testing.assert_array_equal(split_labels(labels, z, 3, [np.array([4, 5]), np.array([0])]), [0, 0, 0, 0, 2, 2, 1, 1])
    # then halves: group 0 (now 4 particles) gives up its worse half, particles 2 and 3
    np.testing.assert_array_equal(split_labels(labels, z, 4, [np.array([4, 5])]), [0, 0, 3, 3, 2, 2, 1, 1])


def test_split_labels_fill_classes_the_stage_left_empty():
    """Fewer distinct classes than the stage had (one went empty in the sample): more splits make up for it."""
    out = split_labels(np.array([3, 3, 3, 3, 3, 3, 3, 3]), np.arange(8.0), 4)
    assert np.bincount(out).tolist() == [2, 2, 2, 2]


def test_start_is_validated():
    with pytest.raises(Cryo2DError, match="--start"):
        EMConfig(start="kmeans").validate()


def _start_ncc(particles, sim, start: str) -> np.ndarray:
    """(K, views) best NCC of each starting class with each true view projection."""
    from cryo2d.em.engine import Engine
    from cryo2d.em.start import start_classes
    from cryo2d.evaluate import best_ncc, fourier_resample

    eng = Engine(particles, EMConfig(n_classes=3, batch_size_per_class=20, seed=0, start=start))
    start_classes(eng)
    classes = eng._to_real(eng.state.A).cpu().numpy()
    views = sim.view_projections
    return np.array([[best_ncc(fourier_resample(c, views.shape[-1]), v, psi_step_deg=5.0) for v in views]
                     for c in classes])


def test_split_start_classes_are_views_not_blurs(particles3, sim3):
    """Three views at SNR 10, K = 3: the split start holds views; random subsets hold blurs of all of them.

    The stages run 1 then 2 classes, and the two are split into 3 at the
    end: one class is a view on its own (its NCC with it near 1, measured
    0.998), the other two hold the two most alike views (their projections
    correlate at 0.94) and are parted by the iterations that follow. Random
    subsets at random angles are three copies of one rotational blur of
    the three views (measured: best NCC 0.92, all with the same view).
    """
    split = _start_ncc(particles3, sim3.sim, "split")
    random = _start_ncc(particles3, sim3.sim, "random")
    assert split.max() >= 0.99, split  # a sharp, aligned view
    assert random.max() < 0.96, random
    assert len(set(split.argmax(axis=1).tolist())) >= 2, split  # the classes differ in view
    assert len(set(random.argmax(axis=1).tolist())) == 1, random


def test_a_split_start_run_is_seeded(particles3, helpers):
    """A whole run from the split start: the same seed gives the same classes and labels; another seed
    other ones. The stages are the start, not iterations of the schedule: the log has the schedule's."""
    from cryo2d.em.engine import run_em

    config = helpers.tiny_config(start="split")
    a, b = run_em(particles3, config), run_em(particles3, config)
    np.testing.assert_array_equal(a.class_index, b.class_index)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert len(a.history) == config.n_online_iterations + config.n_full_iterations
    other = run_em(particles3, helpers.tiny_config(start="split", seed=1))
    assert not np.array_equal(other.classes, a.classes)


def test_the_split_start_says_each_stage_as_it_ends(particles3, helpers):
    """The stages run before the first iteration: one line each for the user, with its class counts;
    none from the random start."""
    from cryo2d.em.engine import run_em
    from cryo2d.em.start import stage_sizes

    lines = []
    run_em(particles3, helpers.tiny_config(start="split", n_classes=5), on_note=lines.append)
    assert stage_sizes(5) == [1, 2, 4]
    assert [line.split(":")[0] for line in lines] == [f"split start, stage {i} of 3" for i in (1, 2, 3)], lines
    assert [line.split(": ")[1].split(" in ")[0] for line in lines] == [
        "1 class, split into 2", "2 classes, split into 4", "4 classes, split into 5"], lines
    lines.clear()
    run_em(particles3, helpers.tiny_config(start="random"), on_note=lines.append)
    assert lines == []
