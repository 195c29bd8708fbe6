"""pf-serve's limits: each bad request gets its status and OpenAI's error JSON, and the server
keeps serving; the CLI's connection limit and its shutdown on SIGTERM (a real pf-serve process on
127.0.0.1: it exits 0 within its grace period, mid-stream)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("uvicorn")

from pf_engine import Engine  # noqa: E402
from pf_engine.serve import build_app  # noqa: E402
from pf_engine.serve.limits import depth  # noqa: E402
from pf_engine.serve.threaded import ThreadedServer  # noqa: E402

MID = "tiny"
LIMIT = 4096


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    eng = Engine.from_pretrained(tiny_chat_model[0], progress=False, device="cpu", dtype="fp32")
    eng.new_scheduler(slots=4, max_len=128)
    s = ThreadedServer(build_app(eng, MID, max_body=LIMIT, timeout_s=60))
    yield s
    s.close()


def healthy(url: str, model: str = MID) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi",
                                                  "max_tokens": 2, "temperature": 0},
                   timeout=60)     # httpx's 5 s default: a fresh server's first request on a busy CI machine
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def padded(n: int) -> bytes:
    return json.dumps({"model": MID, "prompt": "hi", "max_tokens": 1, "user": "x" * n}).encode()


@pytest.mark.parametrize("body,status,words", [
    (padded(LIMIT), 413, "larger than 4096 bytes"),
    ("chunked", 413, "larger than 4096 bytes"),             # no Content-Length: counted as read
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "non-finite number NaN"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}', 400, "non-finite"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}', 400, "overflows a float"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "deeper than 32"),
    (b"[" * 1500 + b"]" * 1500, 400, "deeper than 32"),       # past json's own recursion limit
], ids=["large", "chunked", "nan", "infinity", "overflow", "deep", "deeper"])
def test_each_limit_answers_and_the_server_keeps_serving(server, body, status, words):
    url = server.url + "/v1/completions"
    if body == "chunked":
        def pieces():
            for _ in range(8):
                yield b" " * 1024
            yield padded(10)
        r = httpx.post(url, content=pieces(), headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == "body" and "type" in err
    healthy(server.url)
    assert len(padded(10)) < LIMIT                        # a small body passes


def test_depth():
    assert depth(1) == 0 and depth([]) == 1 and depth({"a": [1, {"b": []}]}) == 4


# the CLI: connections and shutdown ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(model: str, *extra: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "pf_engine.cli.serve", "--model", model,
           "--device", "cpu", "--port", str(port), "--grace-s", "3", "--quiet", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            # "connection: close": the server drops this probe's socket itself, at once, so
            # no kept-alive probe is still open when a test counts the server's connections
            if httpx.get(url + "/health", timeout=1,
                         headers={"connection": "close"}).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"pf-serve did not start: {proc.stderr.read().decode()[-2000:]}")
    return proc, url


@pytest.fixture()
def cli_server(tiny_chat_model):
    proc, url = start_cli(tiny_chat_model[0], "--max-connections", "2")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def closed_by_server(s: socket.socket, wait_s: float) -> bool:
    """The server closed ``s`` (a read gives EOF or a reset) within ``wait_s``."""
    s.settimeout(wait_s)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_connection_limit_and_sigterm_mid_stream(cli_server):
    """At the connection limit (2) a real request closes the longest idle socket and is served
    (it used to get 503 while idle sockets held every place)."""
    proc, url = cli_server
    idle = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            for _ in range(2)]                         # two open connections: the limit
    try:
        time.sleep(0.3)
        r = httpx.get(url + "/health")
        assert r.status_code == 200
        assert closed_by_server(idle[0], 5) and not closed_by_server(idle[1], 0.2)
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    mid = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    healthy(url, mid)
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"model": mid, "prompt": "hi", "max_tokens": 200, "stream": True,
                            "temperature": 1.0, "seed": 1}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")        # the stream is running
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for _ in lines:                                # it ends: finished or cut at the grace
            pass
    rc = proc.wait(timeout=15)
    assert rc == 0 and time.monotonic() - t0 < 3 + 10
    assert "shut down on SIGTERM after" in proc.stderr.read().decode()


def test_a_thousand_idle_sockets_do_not_hold_the_server(tiny_chat_model):
    """1,000 sockets that connect and send nothing: a real request is still answered (the time
    is printed, not asserted), and the idle sockets are closed once the header timeout (2 s
    here) has passed."""
    proc, url = start_cli(tiny_chat_model[0], "--header-timeout-s", "2")
    port = int(url.rsplit(":", 1)[1])
    idle = []
    try:
        body = {"model": httpx.get(url + "/v1/models").json()["data"][0]["id"], "prompt": "hi",
                "max_tokens": 2, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        took = time.monotonic() - t0
        print(f"a request beside 1000 idle sockets: {r.status_code} in {took:.3f} s")
        assert r.status_code == 200
        time.sleep(2.5)
        open_ = [s for s in idle if not closed_by_server(s, 0.01)]
        assert not open_, f"{len(open_)} of 1000 idle sockets still open after the header timeout"
    finally:
        for s in idle:
            s.close()
        proc.kill()
        proc.wait(timeout=10)
