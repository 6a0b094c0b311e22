"""CryoSPARC result groups (.csg): each slot from the .cs file it names, matched by uid; written beside each .cs."""
from datetime import datetime

import numpy as np
import pytest
import yaml
from particle_files import make_cs_dataset, random_assignments

from cryo2d.errors import Cryo2DError
from cryo2d.io import read_particles, write_particles
from cryo2d.io.csg import result_group_text


def _group(slots: dict, kind: str = "particle") -> str:
    """A .csg in CryoSPARC's export layout: ``slots`` maps slot -> (metafile as written, num_items)."""
    results = {slot: {"metafile": metafile, "num_items": n, "type": f"{kind}.{slot}"} for slot, (metafile, n) in slots.items()}
    return yaml.safe_dump({"created": "2026-12-06 10:00:00.000000",
                           "group": {"name": "particles", "title": "Particles", "type": kind, "description": "x"},
                           "results": results, "version": "v4.4.1"})


def _save(path, array):
    with open(path, "wb") as handle:
        np.save(handle, array)


def _split(array: np.ndarray, names: list[str]) -> np.ndarray:
    out = np.empty(len(array), dtype=[(n, array.dtype.fields[n][0]) for n in names])
    for name in names:
        out[name] = array[name]
    return out


def test_write_cs_writes_its_result_group(tmp_path):
    """Beside each .cs, the .csg that CryoSPARC's Import Result Group reads: one slot per field prefix, in that file."""
    _, cs, _, _ = make_cs_dataset(tmp_path)
    particles = read_particles(cs)
    for name, rows in (("particles.cs", None), ("rejected.cs", np.array([3, 1])), ("none.cs", np.zeros(0, int))):
        write_particles(particles, tmp_path / name, random_assignments(len(particles)), rows=rows)
        out = np.load(tmp_path / name)
        group = yaml.safe_load((tmp_path / name).with_suffix(".csg").read_text())
        slots = {field.split("/")[0] for field in out.dtype.names if "/" in field}
        assert {"alignments2D", "alignments3D", "blob", "ctf"} == slots
        assert group["group"]["type"] == "particle" and group["group"]["name"] == name[:-3]
        assert set(group["results"]) == slots
        for slot, result in group["results"].items():
            assert result == {"metafile": f">{name}", "num_items": len(out), "type": f"particle.{slot}"}
        assert str(group["version"]).startswith("v4")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_result_group_quotes_what_yaml_would_misread():
    text = result_group_text("it's #1: a.cs", ["uid", "blob/path", "ctf/df1_A"], 7, created=datetime(2026, 1, 2, 3, 4, 5))
    group = yaml.safe_load(text)
    assert group["results"]["ctf"] == {"metafile": ">it's #1: a.cs", "num_items": 7, "type": "particle.ctf"}
    assert set(group["results"]) == {"blob", "ctf"} and str(group["created"]).startswith("2026-01-02 03:04:05")
    assert group["group"]["name"] == "it's #1: a" and group["group"]["title"] == "It's #1: a"


def test_template_groups_and_blob_paths_outside_the_project(tmp_path):
    from cryo2d.io.cs import project_blob_path
    from cryo2d.io.csg import write_templates

    _, cs, _, _ = make_cs_dataset(tmp_path)
    particles = read_particles(cs)  # its blob/paths are relative to tmp_path (stack1's with a '>')
    assert project_blob_path(particles, tmp_path / "job" / "classes.mrcs") == "job/classes.mrcs"
    outside = tmp_path.parent / "elsewhere.mrcs"
    assert project_blob_path(particles, outside) == str(outside.resolve())
    write_templates(tmp_path / "t.cs", "job/classes.mrcs", np.array([4, 1]), 16, 2.5, np.array([12.0, 30.0]))
    out = np.load(tmp_path / "t.cs")
    np.testing.assert_array_equal(out["blob/idx"], [4, 1])
    assert out["blob/path"].tolist() == [b"job/classes.mrcs"] * 2 and out["blob/sign"].tolist() == [1.0, 1.0]
    np.testing.assert_allclose(out["blob/res_A"], [12.0, 30.0])
    again = np.load(tmp_path / "t.cs")  # the same uids when written again
    write_templates(tmp_path / "t.cs", "job/classes.mrcs", np.array([4, 1]), 16, 2.5, np.array([12.0, 30.0]))
    np.testing.assert_array_equal(np.load(tmp_path / "t.cs")["uid"], again["uid"])
    group = yaml.safe_load((tmp_path / "t.csg").read_text())
    assert group["group"]["type"] == "template" and group["results"]["blob"]["type"] == "template.blob"


def test_a_written_group_reads_back_as_its_cs(tmp_path):
    _, cs, images, _ = make_cs_dataset(tmp_path)
    write_particles(read_particles(cs), tmp_path / "J5" / "out.cs", random_assignments(12))
    from_cs = read_particles(tmp_path / "J5" / "out.cs")
    from_csg = read_particles(tmp_path / "J5" / "out.csg")
    assert from_csg.kind == "cs" and from_csg.source == tmp_path / "J5" / "out.csg"
    assert from_csg.extra["cs_array"].dtype == from_cs.extra["cs_array"].dtype
    for name in from_cs.extra["cs_array"].dtype.names:
        np.testing.assert_array_equal(from_csg.extra["cs_array"][name], from_cs.extra["cs_array"][name], err_msg=name)
    np.testing.assert_array_equal(from_csg.stack.read(np.arange(12)), images)
    assert from_csg.extra["passthrough"] == []


def test_slots_from_two_files_matched_by_uid(tmp_path):
    """An export whose ctf slot lies in a passthrough file (other row order, more particles): each slot from its file."""
    _, cs, images, ctf = make_cs_dataset(tmp_path)
    array = np.load(cs)
    own = [n for n in array.dtype.names if not n.startswith("ctf/")]
    main = _split(array, own + ["ctf/df1_A"])
    main["ctf/df1_A"] = -1.0  # a stale value: the group takes ctf/* from the file its ctf slot names
    _save(tmp_path / "J5" / "J5_particles.cs", main)
    extra = np.zeros(3, dtype=array.dtype)
    extra["uid"] = [7, 8, 9]
    passthrough = _split(np.concatenate([array[::-1], extra]), ["uid"] + [n for n in array.dtype.names if n.startswith("ctf/")])
    _save(tmp_path / "J5" / "J5_passthrough_particles.cs", passthrough)
    slots = {"blob": (">J5_particles.cs", 12), "alignments3D": (">J5_particles.cs", 12),
             "ctf": (">J5_passthrough_particles.cs", 15)}
    (tmp_path / "J5" / "export.csg").write_text(_group(slots))
    particles = read_particles(tmp_path / "J5" / "export.csg")
    np.testing.assert_allclose(particles.ctf.defocus_u_angst, ctf["defocus_u_angst"], rtol=1e-6)
    np.testing.assert_allclose(particles.ctf.defocus_angle_deg, ctf["defocus_angle_deg"], rtol=1e-5)
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)
    assert [(p.name, sorted(f)) for p, f in particles.extra["passthrough"]] == [
        ("J5_passthrough_particles.cs", sorted(n for n in array.dtype.names if n.startswith("ctf/")))]
    np.testing.assert_array_equal(particles.extra["cs_array"]["alignments3D/pose"], array["alignments3D/pose"])


def test_metafiles_and_stacks_relative_to_the_project_folder(tmp_path, monkeypatch):
    """An export in PROJECT/exports/groups/...: names without '>' are found from the folder with project.json."""
    _, cs, images, _ = make_cs_dataset(tmp_path)
    (tmp_path / "project.json").write_text("{}")
    array = np.load(cs)
    array["blob/path"] = [p.lstrip(b">") for p in array["blob/path"]]
    _save(cs, array)
    group = tmp_path / "exports" / "groups" / "P1_J5_particles"
    group.mkdir(parents=True)
    (group / "P1_J5_particles_exported.csg").write_text(_group({"blob": ("J5/particles.cs", 12),
                                                                "ctf": ("J5/particles.cs", 12)}))
    monkeypatch.chdir(group)
    particles = read_particles("P1_J5_particles_exported.csg")
    np.testing.assert_array_equal(particles.stack.read(np.arange(12)), images)
    assert "alignments3D/pose" not in particles.extra["cs_array"].dtype.names  # not a slot of the group


@pytest.mark.parametrize("text, message", [
    ("results: [", "not a CryoSPARC result group"),
    ("- a\n- b\n", "not a CryoSPARC result group (no results)"),
    (_group({"blob": (">J5/particles.cs", 12)}, kind="volume"), "a result group of volume type, not particles"),
    (_group({"ctf": (">J5/particles.cs", 12)}), "no blob slot (the group names no particle images)"),
    (_group({"blob": (">J5/missing.cs", 12)}), "slot blob: file J5/missing.cs not found"),
    (_group({"blob": (">J5/particles.cs", 10)}), "slot blob: particles.cs holds 12 rows, the group says 10"),
    (_group({"blob": (">J5/particles.cs", 12), "location": (">J5/particles.cs", 12)}),
     "slot location: particles.cs has no location/* fields"),
    (_group({"blob": (">J5/particles.cs", 12), "ctf": (">J5/few.cs", 3)}),
     "slot ctf: few.cs does not hold each particle once (matched by uid)"),
])
def test_bad_groups_are_one_line_errors(tmp_path, text, message):
    _, cs, _, _ = make_cs_dataset(tmp_path)
    _save(tmp_path / "J5" / "few.cs", np.load(cs)[:3])
    (tmp_path / "bad.csg").write_text(text)
    with pytest.raises(Cryo2DError) as err:
        read_particles(tmp_path / "bad.csg")
    assert str(err.value).startswith(f"{tmp_path / 'bad.csg'}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
