"""Known-answer tests for the ground-truth scores in cryo2d.evaluate."""
from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy import ndimage

import cryo2d.evaluate as evaluate
from cryo2d.errors import Cryo2DError
from cryo2d.evaluate import (
    align_ncc,
    best_ncc,
    class_details,
    fourier_resample,
    junk_f1,
    purity,
    rare_view_recovered,
    read_job_labels,
    score_classification,
    score_job,
)

# Hand-made classification (view -1 = junk):
#   class 0: 4 junk + 1 of view 5      -> junk class (4/5 > 1/2)
#   class 1: 3 junk + 3 of view 1      -> not junk (exactly half), purity 3/6
#   class 2: 4 of view 2               -> purity 1
#   class 3: 2 of view 0, 1 of view 2, 1 junk -> purity 2/4
#   class 4: 3 junk                    -> junk class
#   class 5: empty
#   unassigned (-1): 1 junk, 1 of view 3
VIEWS = np.array(
    [-1, -1, -1, -1, 5]
    + [-1, -1, -1, 1, 1, 1]
    + [2, 2, 2, 2]
    + [0, 0, 2, -1]
    + [-1, -1, -1]
    + [-1, 3]
)
LABELS = np.array([0] * 5 + [1] * 6 + [2] * 4 + [3] * 4 + [4] * 3 + [-1] * 2)


def _blob_image(box: int, seed: int = 0) -> np.ndarray:
    """Asymmetric sum of Gaussians, zero near the edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box // 2
    img = np.zeros((box, box))
    for _ in range(5):
        cx, cy = rng.uniform(-box / 6, box / 6, size=2)
        sigma = rng.uniform(box / 20, box / 10)
        img += rng.uniform(0.5, 1.5) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return img


def test_class_details_by_hand():
    d = {c.label: c for c in class_details(VIEWS, LABELS)}
    assert sorted(d) == [0, 1, 2, 3, 4]
    assert d[0].is_junk_class and d[0].dominant_view == 5 and d[0].n_junk == 4
    assert not d[1].is_junk_class and d[1].dominant_view == 1 and d[1].purity == pytest.approx(0.5)
    assert d[2].purity == 1.0 and d[2].dominant_view == 2
    assert d[3].dominant_view == 0 and d[3].purity == pytest.approx(0.5)
    assert d[4].is_junk_class and d[4].dominant_view == -1 and d[4].n_particles == 3


def test_junk_f1_by_hand():
    # Predicted junk: classes 0 and 4 (8 particles), 7 of them junk -> TP 7, FP 1.
    # True junk: 12 particles -> FN 5.  F1 = 14 / (14 + 1 + 5).
    assert junk_f1(VIEWS < 0, LABELS) == pytest.approx(0.7)


def test_junk_f1_edge_cases():
    assert junk_f1(np.zeros(4, bool), np.array([0, 0, 1, 1])) == 1.0  # no junk anywhere
    assert junk_f1(np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1])) == 1.0
    assert junk_f1(np.array([1, 0, 1, 0], bool), np.array([0, 0, 1, 1])) == 0.0  # all classes half junk


def test_purity_by_hand():
    assert purity(VIEWS, LABELS) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert np.isnan(purity(np.array([-1, -1]), np.array([0, 0])))


def test_dominant_view_tie_takes_smallest_id():
    (d,) = class_details(np.array([4, 4, 2, 2]), np.array([7, 7, 7, 7]))
    assert d.dominant_view == 2 and d.purity == 0.5 and d.label == 7


def test_rare_view_recovered_by_hand():
    assert rare_view_recovered(VIEWS, LABELS, 2)
    assert rare_view_recovered(VIEWS, LABELS, 0)
    assert not rare_view_recovered(VIEWS, LABELS, 3)  # only unassigned
    assert not rare_view_recovered(VIEWS, LABELS, 5)  # dominant only in a junk class
    assert rare_view_recovered(VIEWS, LABELS, None) is None  # the set has no rare view


@pytest.mark.parametrize("psi_deg", [0.0, 30.0, 37.0, 211.0])
def test_ncc_of_rotated_shifted_copy_is_one(psi_deg):
    ref = _blob_image(48)
    img = ndimage.rotate(ref, psi_deg, reshape=False, order=3)
    img = np.roll(img, (3, -2), axis=(0, 1))
    assert best_ncc(img, ref) > 0.98


def test_ncc_recovers_pose():
    ref = _blob_image(48, seed=3)
    img = np.roll(ref, (2, -4), axis=(0, 1))  # y + 2, x - 4
    a = align_ncc(img, ref)
    assert a.ncc == pytest.approx(1.0, abs=1e-6)
    assert (a.psi_deg, a.shift_x_px, a.shift_y_px) == (0.0, 4, -2)


def test_ncc_refines_to_a_fraction_of_a_pixel(monkeypatch):
    """A copy moved by a fraction of a pixel scores 1, with the fractional shift recovered."""
    ref = _blob_image(48, seed=3)
    ky, kx = np.meshgrid(np.fft.fftfreq(48), np.fft.fftfreq(48), indexing="ij")
    dx, dy = 0.375, -1.25  # img(p) = ref(p - d): moved by +d
    img = np.fft.ifft2(np.fft.fft2(ref) * np.exp(-2j * np.pi * (kx * dx + ky * dy))).real
    a = align_ncc(img, ref)
    assert a.ncc == pytest.approx(1.0, abs=1e-9)
    assert (a.psi_deg, a.shift_x_px, a.shift_y_px) == pytest.approx((0.0, -dx, -dy), abs=1e-9)
    monkeypatch.setattr(evaluate, "_REFINE_ROUNDS", 0)  # the whole-pixel grid alone reads less
    assert align_ncc(img, ref).ncc < 0.9999


def test_ncc_is_rotation_invariant():
    ref = _blob_image(48, seed=1)
    img = _blob_image(48, seed=2)
    base = best_ncc(img, ref)
    for psi in (60.0, 144.0, 270.0):
        rotated = ndimage.rotate(img, psi, reshape=False, order=3)
        assert best_ncc(rotated, ref) == pytest.approx(base, abs=0.02)


def test_ncc_of_unrelated_noise_is_near_zero():
    rng = np.random.default_rng(0)
    ref = _blob_image(48)
    noise = rng.standard_normal((48, 48))
    value = best_ncc(noise, ref, max_shift_px=2, psi_step_deg=10)
    assert abs(value) < 0.3  # max over 36 * 25 poses of ~N(0, 1/sqrt(n_mask))
    assert best_ncc(np.zeros((48, 48)), ref) == 0.0


def test_ncc_is_invariant_to_affine_intensity():
    ref = _blob_image(48)
    assert best_ncc(3.0 * ref + 7.0, ref) == pytest.approx(1.0, abs=1e-6)
    assert best_ncc(-ref, ref) < 0.9


def test_ncc_with_different_box_sizes():
    big = _blob_image(64, seed=4)
    small = fourier_resample(big, 32)
    assert small.shape == (32, 32)
    assert best_ncc(big, small) == pytest.approx(1.0, abs=1e-6)
    assert best_ncc(small, big) > 0.98  # the upsampled copy lost the high frequencies
    assert fourier_resample(big, 64) == pytest.approx(big)


def _tiny_dataset(box=32, seed=0):
    """Truth table, views and class averages that are rotated views."""
    views = np.stack([_blob_image(box, seed=s) for s in range(6)])
    truth = pd.DataFrame({"index": np.arange(VIEWS.size), "view": VIEWS})
    truth["kind"] = np.where(VIEWS < 0, "noise", "particle")
    classes = np.stack(
        [
            np.random.default_rng(9).standard_normal((box, box)),  # junk class 0
            ndimage.rotate(views[1], 50, reshape=False, order=3),
            np.roll(views[2], 2, axis=1),
            ndimage.rotate(views[0], 130, reshape=False, order=3),
            np.random.default_rng(10).standard_normal((box, box)),  # junk class 4
            np.zeros((box, box)),  # empty
        ]
    )
    return truth, views, classes


def test_score_classification_by_hand():
    truth, views, classes = _tiny_dataset()
    s = score_classification(truth, LABELS, classes, views, rare_view=2)
    assert s["junk_f1"] == pytest.approx(0.7)
    assert s["purity"] == pytest.approx(2 / 3)
    assert s["rare_view_recovered"] is True
    assert s["median_ncc"] > 0.98
    assert (s["n_nonempty_classes"], s["n_junk_classes"], s["n_particle_classes"]) == (5, 2, 3)
    assert s["n_empty_classes"] == 1 and s["n_unassigned"] == 2
    assert np.isnan(s["classes"][0]["ncc"]) and s["classes"][1]["ncc"] > 0.98


def _write_sim(tmp_path, truth, views, rare_view=2):
    sim = tmp_path / "sim"
    sim.mkdir(parents=True)
    truth.to_csv(sim / "truth.csv", index=False)
    (sim / "truth.json").write_text(json.dumps({"rare_view": rare_view, "n_views": len(views)}))
    with mrcfile.new(sim / "views.mrcs") as m:
        m.set_data(views.astype(np.float32))
    return sim


def _write_job(path, labels, classes, order, stem="particles", classes_name="classes.mrcs"):
    path.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in order],
            "rlnClassNumber": labels[order] + 1,
        }
    )
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0]})
    starfile.write({"optics": optics, "particles": rows}, path / f"{stem}.star", overwrite=True)
    with mrcfile.new(path / classes_name, overwrite=True) as m:
        m.set_data(classes.astype(np.float32))


def test_read_job_labels_any_order_and_missing(tmp_path):
    labels = np.array([2, 0, 1, 1, 0])
    order = np.array([4, 1, 0, 3])  # shuffled, particle 2 missing
    _write_job(tmp_path / "job", labels, np.zeros((3, 8, 8)), order)
    got, n_missing = read_job_labels(tmp_path / "job" / "particles.star", 5)
    assert got.tolist() == [2, 0, -1, 1, 0] and n_missing == 1


def test_read_job_labels_rejects_bad_names(tmp_path):
    star = tmp_path / "bad.star"
    starfile.write(pd.DataFrame({"rlnImageName": ["particles.mrcs"], "rlnClassNumber": [1]}), star)
    with pytest.raises(Cryo2DError, match="bad.star"):
        read_job_labels(star, 3)


def test_score_job_cryo2d_and_relion_layouts(tmp_path):
    truth, views, classes = _tiny_dataset()
    sim = _write_sim(tmp_path, truth, views)
    known = LABELS >= 0
    order = np.random.default_rng(0).permutation(np.flatnonzero(known))

    _write_job(tmp_path / "cryo2d", LABELS, classes, order)
    s = score_job(tmp_path / "cryo2d", sim)
    assert s["junk_f1"] == pytest.approx(0.7) and s["n_missing"] == 2
    assert s["median_ncc"] > 0.98 and s["rare_view_recovered"]

    relion = tmp_path / "relion"
    _write_job(relion, np.zeros_like(LABELS), classes[:1], order, "run_it001_data", "run_it001_classes.mrcs")
    _write_job(relion, LABELS, classes, order, "run_it025_data", "run_it025_classes.mrcs")
    r = score_job(relion, sim)
    assert r["particles_star"].endswith("run_it025_data.star")
    assert r["purity"] == pytest.approx(s["purity"]) and r["n_empty_classes"] == 1

    pair = score_job((relion / "run_it025_data.star", relion / "run_it025_classes.mrcs"), sim)
    assert pair["junk_f1"] == pytest.approx(0.7)

    none = _write_sim(tmp_path / "no-rare", truth, views, rare_view=None)  # truth.json's "rare_view": null
    assert score_job(tmp_path / "cryo2d", none)["rare_view_recovered"] is None


def test_score_job_without_outputs_names_folder(tmp_path):
    truth, views, _ = _tiny_dataset()
    sim = _write_sim(tmp_path, truth, views)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Cryo2DError, match="empty"):
        score_job(tmp_path / "empty", sim)
