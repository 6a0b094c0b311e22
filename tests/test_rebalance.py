"""cryo2d rebalance: rotation-invariant grouping of classes, capped shares, seeded drops."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import starfile
import torch
from test_select import cs_job, sim_data, write_job  # noqa: F401 (sim_data is a fixture)

from cryo2d.cli.main import main
from cryo2d.fourier import rotate_images
from cryo2d.rebalance import cap_size, class_similarity, rebalance


@pytest.fixture(scope="session")
def dominant_job(sim_data, tmp_path_factory):  # noqa: F811
    """Only real particles; view 0 dominant (all its particles) and split into 3 classes.

    Views 1 and 2 keep 40 % of their particles, the rare view all. The three
    view-0 classes are the clean view turned by 0°, 70° and mirrored + 150°
    (so only a rotation/mirror-invariant comparison groups them); every
    average gets a little noise. Returns (job, class -> view, view per row).
    """
    folder, sim = sim_data
    truth = sim.truth
    rng = np.random.default_rng(1)
    views = sim.view_projections
    view = truth["view"].to_numpy()
    is_particle = (truth["kind"] == "particle").to_numpy()
    keep = is_particle & ((view == 0) | (view == 3) | (rng.random(len(view)) < 0.4))
    # classes: 1-3 = view 0 (split at random), 4 = view 1, 5 = view 2, 6 = view 3 (rare)
    class_index = np.full(len(view), -1)
    class_index[view == 0] = rng.integers(0, 3, (view == 0).sum())
    class_index[view == 1], class_index[view == 2], class_index[view == 3] = 3, 4, 5
    base = torch.from_numpy(views[[0, 0, 0, 1, 2, 3]].copy())
    base[2] = _mirror(base[2])
    averages = rotate_images(base, torch.tensor([0.0, 70.0, 150.0, 0.0, 0.0, 0.0])).numpy()
    averages = averages + 0.05 * averages.std() * rng.normal(size=averages.shape)
    job = write_job(tmp_path_factory.mktemp("rebalance") / "job", folder, class_index,
                    averages.astype(np.float32), rows=np.flatnonzero(keep))
    return job, np.array([0, 0, 0, 1, 2, 3]), view


def _kept_views(path, view):
    table = starfile.read(path)["particles"]
    return view[table["rlnImageName"].str.partition("@")[0].astype(int).to_numpy() - 1]


def _mirror(images: torch.Tensor) -> torch.Tensor:
    """x -> -x about the centre pixel box // 2 (the one rotate_images turns about)."""
    box = images.shape[-1]
    x = (2 * (box // 2) - torch.arange(box)) % box
    return images[..., x]


def test_similarity_is_rotation_and_mirror_invariant(sim_data):  # noqa: F811
    views = torch.from_numpy(sim_data[1].view_projections)
    turned = rotate_images(_mirror(views[:1]), torch.tensor([123.0]))
    sim = class_similarity(torch.cat([views, turned]).numpy())
    assert sim[0, -1] > 0.95
    # An exact mirror of sharp detail on an even box: 0.77 when mirrored about the wrong centre.
    y, x = torch.meshgrid(torch.arange(48.0) - 24, torch.arange(48.0) - 24, indexing="ij")
    blobs = sum(torch.exp(-((x - px) ** 2 + (y - py) ** 2) / 4.5) for px, py in [(0, 0), (6, 2), (-4, 7), (3, -9), (9, -4)])
    pair = class_similarity(torch.stack([blobs, _mirror(blobs)]).numpy())
    assert pair[0, 1] > 0.99
    off = sim[:4, :4][~np.eye(4, dtype=bool)]
    assert off.max() < 0.9  # distinct views stay apart
    np.testing.assert_allclose(sim, sim.T)


def test_rebalance_caps_dominant_view_and_keeps_every_view(dominant_job, tmp_path, capsys):
    job, view_of_class, view = dominant_job
    before = _kept_views(job / "particles.star", view)
    share_before = (before == 0).mean()
    assert share_before > 0.45
    assert main(["rebalance", str(job), "-o", str(tmp_path / "r"), "--max-share", "0.3", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "before -> after" in printed and "kept" in printed
    supers = starfile.read(tmp_path / "r" / "superclasses.star")
    groups = supers["superclass"].to_numpy()
    assert len(set(groups[:3])) == 1 and len(set(groups)) == 4  # the three view-0 classes are one view
    after = _kept_views(tmp_path / "r" / "particles.star", view)
    dropped = _kept_views(tmp_path / "r" / "dropped.star", view)
    assert len(after) + len(dropped) == len(before)
    shares = np.bincount(after, minlength=4) / len(after)
    assert shares.max() <= 0.3 + 1e-9 and shares[0] < share_before
    assert (shares > 0).all()  # every view kept
    assert (after == 3).sum() == (before == 3).sum()  # the rare view loses nothing
    assert set(dropped) == {0}


def test_same_seed_same_result(dominant_job, tmp_path):
    job = dominant_job[0]
    a = rebalance(job, tmp_path / "a", max_share=0.3, seed=7)
    b = rebalance(job, tmp_path / "b", max_share=0.3, seed=7)
    c = rebalance(job, tmp_path / "c", max_share=0.3, seed=8)
    np.testing.assert_array_equal(a.keep, b.keep)
    assert (tmp_path / "a" / "particles.star").read_text().split("\n", 1)[1] == \
        (tmp_path / "b" / "particles.star").read_text().split("\n", 1)[1]
    assert not np.array_equal(a.keep, c.keep) and a.keep.sum() == c.keep.sum()


def test_explicit_superclasses_and_unreachable_share(dominant_job, tmp_path):
    job = dominant_job[0]
    result = rebalance(job, tmp_path / "n6", max_share=0.5, n_superclasses=6)
    assert result.superclass_of_class.tolist() == [1, 2, 3, 4, 5, 6]
    result = rebalance(job, tmp_path / "tight", max_share=0.1)  # 4 views cannot each be <= 10 %
    assert result.notes and (result.counts_after == result.counts_before.min()).all()
    assert result.notes[0].startswith(f"only {len(result.counts_before)} superclasses: no cap can bring each to 0.1")
    one = rebalance(job, tmp_path / "one", max_share=0.5, n_superclasses=1)
    assert one.notes[0].startswith("only 1 superclass: no cap")  # not "1 superclasses"


def test_rebalance_of_a_selection_groups_only_the_selected_classes(dominant_job, tmp_path, capsys):
    """``cryo2d select`` then ``cryo2d rebalance`` on its folder: the job's class numbers throughout."""
    job, _, view = dominant_job
    assert main(["select", str(job), "-o", str(tmp_path / "sel"), "--classes", "2,3,5,6"]) == 0
    capsys.readouterr()
    assert main(["rebalance", str(tmp_path / "sel"), "-o", str(tmp_path / "r"), "--max-share", "0.5"]) == 0
    printed = capsys.readouterr().out
    supers = starfile.read(tmp_path / "r" / "superclasses.star")
    assert supers["rlnClassNumber"].tolist() == [2, 3, 5, 6]
    groups = supers["superclass"].to_numpy()
    assert groups[0] == groups[1] and len(set(groups)) == 3  # classes 2 and 3 hold the same view
    assert "(classes 2,3)" in printed
    selected = _kept_views(tmp_path / "sel" / "particles.star", view)
    kept = _kept_views(tmp_path / "r" / "particles.star", view)
    dropped = _kept_views(tmp_path / "r" / "dropped.star", view)
    assert len(kept) + len(dropped) == len(selected)
    assert set(kept) == {0, 2, 3} and (np.bincount(kept, minlength=4) / len(kept)).max() <= 0.5 + 1e-9
    counts = starfile.read(job / "classes.star")["rlnClassParticleCount"].to_numpy()
    np.testing.assert_array_equal(supers["rlnClassParticleCount"], counts[[1, 2, 4, 5]])


def test_outputs_of_earlier_runs_in_the_folder_go(dominant_job, tmp_path, capsys):
    """A .cs job's selection over a STAR one's: rebalance read the stale particles.star (0 particles kept)."""
    job = dominant_job[0]
    csjob, array = cs_job(job, tmp_path / "csjob")
    sel = tmp_path / "sel"
    assert main(["select", str(job), "-o", str(sel), "--classes", "1,2"]) == 0
    assert main(["select", str(csjob), "-o", str(sel), "--classes", "3,4"]) == 0
    capsys.readouterr()
    assert main(["rebalance", str(sel), "-o", str(tmp_path / "r"), "--max-share", "1"]) == 0
    printed = capsys.readouterr().out
    n = int(np.isin(array["alignments2D/class"], [2, 3]).sum())
    assert "without a class" not in printed and f"kept {n} of {n} particles" in printed
    # rebalance over a selection folder, then select over the rebalance folder: each leaves only its own files
    rebalance(sel, tmp_path / "r", max_share=1.0)  # .cs over the STAR job's rebalance
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "dropped.cs", "dropped.csg", "particles.cs", "particles.csg", "superclasses.star"]
    rebalance(job, sel, max_share=1.0)
    assert sorted(p.name for p in sel.iterdir()) == ["dropped.star", "particles.star", "superclasses.star"]
    assert main(["select", str(job), "-o", str(sel), "--classes", "5"]) == 0
    assert sorted(p.name for p in sel.iterdir()) == ["classes.star", "particles.star", "rejected.star", "templates.mrcs"]


def test_rebalance_refuses_a_classification_jobs_folder(dominant_job, tmp_path, capsys):
    job = dominant_job[0]
    other = shutil.copytree(job, tmp_path / "other")
    (other / "checkpoint.pt").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main(["rebalance", str(job), "-o", str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cryo2d: error: {other}: holds a classification job (checkpoint.pt); choose another folder"]
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_cap_size_known_answers():
    assert cap_size(np.array([100, 10, 10]), 0.5) == 20  # 20 <= 0.5 * (20 + 10 + 10)
    assert cap_size(np.array([50, 50]), 0.5) == 50
    assert cap_size(np.array([100, 10]), 0.4) is None  # two groups cannot each hold <= 40 %
    counts = np.array([500, 120, 80, 40, 9])
    cap = cap_size(counts, 0.25)
    kept = np.minimum(counts, cap)
    assert cap / kept.sum() <= 0.25 and (cap + 1) / np.minimum(counts, cap + 1).sum() > 0.25
