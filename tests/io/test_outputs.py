"""Atomic writes: the final name appears only when the whole file is written."""
import json

import pytest

from cryo2d.errors import Cryo2DError
from cryo2d.io.outputs import atomic_path, make_output_folder, write_json_atomic, write_text_atomic


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_keeps_old_file_and_removes_temp_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_text_and_json(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    write_json_atomic(tmp_path / "b.json", {"n": 3, "x": [1.5]})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"n": 3, "x": [1.5]}


def test_a_full_disk_is_a_one_line_error_that_keeps_the_old_file(tmp_path, monkeypatch):
    import cryo2d.io.outputs as outputs

    target = tmp_path / "classes.star"
    target.write_text("old")

    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_fsync", full)
    with pytest.raises(Cryo2DError, match=r"classes.star: cannot write \(No space left on device\)"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.star"]


def test_a_removed_job_folder_is_a_one_line_error(tmp_path):
    """torch.save into a folder that was removed during the run (it raises RuntimeError, not OSError)."""
    import torch

    job = tmp_path / "job"
    job.mkdir()
    job.rmdir()
    with pytest.raises(Cryo2DError, match="checkpoint.pt: cannot write"):
        with atomic_path(job / "checkpoint.pt") as tmp:
            torch.save({"x": 1}, tmp)
    with pytest.raises(Cryo2DError, match="a.txt: cannot write"):
        write_text_atomic(job / "a.txt", "x")


def test_output_folder_is_made_or_refused_in_one_line(tmp_path):
    """Made with its parents (and kept when it exists); a file of that name or a folder under a file: Cryo2DError."""
    made = make_output_folder(tmp_path / "a" / "b")
    assert made.is_dir() and make_output_folder(made) == made
    (tmp_path / "file").write_text("x")
    with pytest.raises(Cryo2DError, match=r"^.*file: exists and is not a folder$"):
        make_output_folder(tmp_path / "file")
    with pytest.raises(Cryo2DError, match=r"file/job: cannot create output folder \(Not a directory\)$"):
        make_output_folder(tmp_path / "file" / "job")
