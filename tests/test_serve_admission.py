"""pf-serve's queue bound under a burst (issue 36): with N slots and a queue of Q, at most N + Q
requests are admitted at once, counted from admission (before any await) to their end, however
the burst's handlers interleave; the rest get 429 with Retry-After; nothing is lost or hung.

A real server on 127.0.0.1 (ThreadedServer, uvicorn) over a tiny model whose scheduler is paused
while the burst arrives, so that no admitted request can finish and free its place meanwhile.
A burst of 100 (the issue's goal) on 2 slots and a queue of 1: exactly 3 admitted, 97 x 429.
Without the reservation (the bound counted only submitted requests) a burst of 12 let 4 in.
"""
import concurrent.futures as cf
import time

import httpx
import pytest

pytest.importorskip("uvicorn")

from pf_engine import Engine  # noqa: E402
from pf_engine.serve import build_app  # noqa: E402
from pf_engine.serve.threaded import ThreadedServer  # noqa: E402

SLOTS, QUEUE, BURST = 2, 1, 100


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    eng = Engine.from_pretrained(tiny_chat_model[0], progress=False, device="cpu", dtype="fp32")
    eng.new_scheduler(slots=SLOTS, max_len=128)
    s = ThreadedServer(build_app(eng, "tiny", max_queue=QUEUE, timeout_s=60))
    yield s, eng
    s.close()


def post(url: str, i: int, stream: bool = False):
    # echo + logprobs: the handler scores its prompt in a worker thread between admission and
    # submission, the window in which a burst's other handlers run their admission
    body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": 4, "temperature": 0,
            "stream": stream, "echo": True, "logprobs": 1}
    with httpx.Client(timeout=60) as c:
        r = c.post(url + "/v1/completions", json=body)
        return r.status_code, r.headers.get("retry-after"), r.text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_burst_admits_slots_plus_queue(server, stream):
    s, eng = server
    sched = eng.scheduler()
    sched.pause()
    try:
        with cf.ThreadPoolExecutor(BURST) as pool:
            futs = [pool.submit(post, s.url, i, stream) for i in range(BURST)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futs) < BURST - SLOTS - QUEUE and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)                       # a late 429 would be counted here too
            early = [f.result() for f in futs if f.done()]
            sched.resume()
            got = [f.result(timeout=60) for f in futs]
    finally:
        sched.resume()
    assert len(early) == BURST - SLOTS - QUEUE and all(code == 429 for code, _, _ in early), early
    assert all(after == "1" for code, after, _ in early)
    assert sorted(code for code, _, _ in got) == [200] * (SLOTS + QUEUE) + [429] * (BURST - SLOTS - QUEUE)
    metrics = httpx.get(s.url + "/metrics").text
    assert "pf_admitted_requests 0.0" in metrics                 # every reservation released
    code, _, _ = post(s.url, 99, stream)                          # and the server still serves
    assert code == 200
