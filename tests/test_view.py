"""cryo2d view: routes, traversal refused, loopback bind, Save = select; one real browser test."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pandas as pd
import pytest
import starfile
from test_select import sim_data, truth_job  # noqa: F401 (fixtures)

from cryo2d.cli.main import build_parser
from cryo2d.errors import Cryo2DError
from cryo2d.gallery.server import make_server
from cryo2d.select import select

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def served(truth_job, tmp_path):  # noqa: F811
    """A copy of the truth job served on a free port; yields (server, job folder)."""
    job = shutil.copytree(truth_job[0], tmp_path / "job")
    server = make_server(job, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, job
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_binds_loopback_by_default(truth_job):  # noqa: F811
    server = make_server(truth_job[0], port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.server_close()
    args = build_parser().parse_args(["view", str(truth_job[0])])
    assert args.host == "127.0.0.1"
    with pytest.raises(Cryo2DError, match="job folder not found"):
        make_server(truth_job[0] / "missing", port=0)
    for port in (-5, 65536):  # used to end in socket's OverflowError traceback
        with pytest.raises(Cryo2DError, match=f"--port must be in 0-65535, got {port}"):
            make_server(truth_job[0], port=port)


def test_routes_and_traversal_404(served):
    server, job = served
    status, body = _request(server, "GET", "/")
    assert status == 200 and b"<title>cryo2d view</title>" in body
    status, body = _request(server, "GET", "/api/classes")
    info = json.loads(body)
    assert status == 200 and len(info["classes"]) == server.job.n_classes
    assert info["classes"][0]["number"] == 1 and info["classes"][0]["count"] == int(server.job.counts[0])
    status, body = _request(server, "GET", "/class/1.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    status, body = _request(server, "GET", "/files/classes.star")
    assert status == 200 and body == (job / "classes.star").read_bytes()
    assert _request(server, "GET", "/static/view.js")[0] == 200
    outside = job.parent / "secret.txt"
    outside.write_text("secret")
    for path in [
        "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt", "/files/%2E%2E%2Fsecret.txt",
        "/../secret.txt", "/static/../server.py", "/static/..%2fserver.py", "/class/../classes.mrcs",
        "/files//etc/passwd", "/files/%2fetc%2fpasswd", f"/files/{outside}", f"/files/{job / 'classes.star'}",
        "/etc/passwd", "//etc/passwd", "/files/", "/files/.", "/files/./classes.star", "/files/nothing.star",
        "/class/0.png", f"/class/{server.job.n_classes + 1}.png", "/class/1.png/../../secret.txt", "/api/../../secret.txt",
        "/files/..\\secret.txt", "/nonsense",
    ]:
        status, body = _request(server, "GET", path)
        assert status == 404, path
        assert b"secret" not in body
    assert _request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403


def test_save_writes_what_select_writes_and_nothing_else(served, tmp_path):
    server, job = served
    before = _digest(job)
    body = json.dumps({"classes": [3, 1]}).encode()
    status, answer = _request(server, "POST", "/api/save", body, {"Content-Type": "application/json"})
    assert status == 200, answer
    answer = json.loads(answer)
    assert answer["classes"] == [1, 3] and answer["summary"].startswith("selected 2 of")
    saved = job / "selected"
    reference = select(job, tmp_path / "ref", classes=[1, 3])
    assert answer["n_kept"] == reference.n_kept
    for name in ("particles.star", "rejected.star"):
        got, want = starfile.read(saved / name), starfile.read(tmp_path / "ref" / name)
        for block in want:
            pd.testing.assert_frame_equal(got[block], want[block])
    assert (saved / "templates.mrcs").read_bytes() == (tmp_path / "ref" / "templates.mrcs").read_bytes()
    assert _digest(job) == before  # the job's own files are untouched
    # refused saves write nothing
    assert _request(server, "POST", "/api/save", body, {"Content-Type": "text/plain"})[0] == 415
    status, answer = _request(server, "POST", "/api/save", b'{"classes": [99]}', {"Content-Type": "application/json"})
    assert status == 400 and "99" in json.loads(answer)["error"]
    assert _request(server, "POST", "/api/save", b"{nope", {"Content-Type": "application/json"})[0] == 400
    assert _request(server, "POST", "/files/classes.star", body, {"Content-Type": "application/json"})[0] == 404


def test_save_out_of_range_class_is_a_400(served, capsys):
    server, job = served
    for number, shown in ((100000000000000000000000, "100000000000000000000000"), (-(10 ** 40), "-1000000000000000000"),
                          (0, "class 0 ")):  # past int64: used to drop the connection with an OverflowError traceback
        body = json.dumps({"classes": [1, number]}).encode()
        status, answer = _request(server, "POST", "/api/save", body, {"Content-Type": "application/json"})
        assert status == 400, answer
        error = json.loads(answer)["error"]
        assert shown in error and f"classes 1-{server.job.n_classes}" in error and len(error) < 120
    assert not (job / "selected").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_host_name_given_is_accepted(truth_job):  # noqa: F811
    name = socket.gethostname().lower()
    try:
        server = make_server(truth_job[0], host=name, port=0)
    except Cryo2DError:
        pytest.skip(f"host name {name!r} cannot be bound here")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for host in (f"{name}:{port}", name, f"{name.upper()}:{port}"):  # used to be 403: compared with the bound IP
            status, body = _request(server, "GET", "/api/classes", headers={"Host": host})
            assert status == 200, (host, body)
        assert server.url == f"http://{name}:{port}/"
        for host in ("evil.example", f"evil.example:{port}", f"{name}.evil.example:{port}", ""):
            assert _request(server, "GET", "/api/classes", headers={"Host": host})[0] == 403, host
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _playwright():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed (pip install playwright)")
    return sync_playwright


def test_browser_click_select_save(served, tmp_path):
    sync_playwright = _playwright()
    server, job = served
    shot = Path(os.environ.get("CRYO2D_VIEW_SCREENSHOT", tmp_path / "view.png"))
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as err:  # a browser that cannot start here is an environment problem
            pytest.skip(f"chromium did not start: {str(err).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=20000)
            tiles = page.locator(".tile")
            assert tiles.count() == server.job.n_classes
            page.select_option("#sort", "count")
            counts = [int(t.split("n=")[1].split()[0]) for t in page.locator(".tile .label").all_inner_texts()]
            assert counts == sorted(counts, reverse=True)
            for number in (2, 4, 5):
                page.click(f".tile[data-class='{number}']")
            page.click(".tile[data-class='5']")  # deselect again
            assert page.locator(".tile.selected").count() == 2
            page.click("#save")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('selected')", timeout=20000)
            assert "selected 2 of" in page.inner_text("#status")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    written = starfile.read(job / "selected" / "particles.star")["particles"]
    assert sorted(written["rlnClassNumber"].unique()) == [2, 4]
    source = starfile.read(job / "particles.star")["particles"]
    assert len(written) == source["rlnClassNumber"].isin([2, 4]).sum()
    assert shot.stat().st_size > 10000
