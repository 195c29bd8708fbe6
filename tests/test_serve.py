"""pf-serve (pf_engine/serve): the real ``openai`` client against a server on 127.0.0.1 (a free
port), a tiny random chat model with a random bank of ten experts and both routers.

Outputs are compared token for token (greedy) with ``Engine.generate`` offline; faults are
made deterministic by pausing the scheduler rather than by timing.
"""
import asyncio
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from pf_engine import Engine  # noqa: E402
from pf_engine.persona.bank import BIG_FIVE, AdapterBank  # noqa: E402
from pf_engine.model.config import ModelConfig  # noqa: E402
from pf_engine.serve import build_app  # noqa: E402
from pf_engine.serve.threaded import ThreadedServer  # noqa: E402

MID = "tiny"
TOP2 = {BIG_FIVE[0]: 0.7, BIG_FIVE[3]: 0.3}


class Server(ThreadedServer):
    def client(self, key="none", cls=None):
        return (cls or openai.OpenAI)(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    folder, _ = tiny_chat_model
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=4, seed=5, router=True)
    eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
    eng.new_scheduler(slots=8, max_len=128)
    return eng


@pytest.fixture(scope="module")
def server(engine):
    s = Server(build_app(engine, MID, max_queue=64, timeout_s=60))
    yield s
    s.close()


def offline(engine, text, persona=None, n=8, chat=True):
    """What the server gives a temperature-0 request: chat takes the chat defaults for the
    fields it leaves out (repetition penalty 1.1 here), completions OpenAI's (none)."""
    sampling = dict(engine.generation_defaults(True)[0], temperature=0) if chat \
        else {"temperature": 0}
    return engine.generate([text], max_new_tokens=n, chat=chat, persona=[persona], **sampling)[0]


def test_chat_and_completion_match_generate(engine, server):
    c = server.client()
    assert [m.id for m in c.models.list().data][:3] == [MID, f"{MID}:{BIG_FIVE[0]}", f"{MID}:{BIG_FIVE[1]}"]
    for model, persona in ((MID, None), (f"{MID}:{BIG_FIVE[2]}", {BIG_FIVE[2]: 1.0}), (f"{MID}:auto", "auto")):
        want = offline(engine, "Tell me a story", persona)
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story"}],
                                      max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.prompt_tokens == want.usage["prompt_tokens"]
        assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert (r.model_extra["persona"] is None) == (persona is None)
        pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8,
            temperature=0, stream=True) if ch.choices]
        assert "".join(pieces) == want.text
    want = offline(engine, "Once upon a time", TOP2, chat=False)
    r = c.completions.create(model=MID, prompt="Once upon a time", max_tokens=8, temperature=0,
                             extra_body={"persona": TOP2})
    assert r.choices[0].text == want.text and r.model_extra["persona"] == want.gates
    stream = c.completions.create(model=MID, prompt="Once upon a time", max_tokens=8, temperature=0,
                                  extra_body={"persona": TOP2}, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_64_concurrent_streams_with_mixed_personas(engine, server):
    models = [MID, f"{MID}:{BIG_FIVE[1]}", f"{MID}:auto", f"{MID}:token"]
    personas = [None, {BIG_FIVE[1]: 1.0}, "auto", "token"]
    prompts = [f"Question number {i}: what now?" for i in range(64)]
    n = [3 + i % 6 for i in range(64)]

    async def main():
        c = server.client(cls=openai.AsyncOpenAI)

        async def one(i):
            s = await c.chat.completions.create(
                model=models[i % 4], messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=n[i], temperature=0, stream=True)
            return i, "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
        return await asyncio.gather(*(one(i) for i in range(64)))
    got = asyncio.run(main())
    assert sorted(i for i, _ in got) == list(range(64))           # none lost or duplicated
    for i, text in got:
        assert text == offline(engine, prompts[i], personas[i % 4], n[i]).text, i


def metric(server, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(server.url + "/metrics").text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_a_client_gone_mid_stream_frees_its_slot(engine, server):
    before = metric(server, "pf_requests_total", status="cancelled")
    body = {"model": MID, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())                       # one event, then hang up
    other = server.client().chat.completions.create(
        model=MID, messages=[{"role": "user", "content": "and you?"}], max_tokens=5, temperature=0)
    assert other.choices[0].message.content == offline(engine, "and you?", None, 5).text
    deadline = time.monotonic() + 20
    while metric(server, "pf_requests_total", status="cancelled") == before:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.05)
    assert not engine.scheduler().running and metric(server, "pf_running_requests") == 0


def test_a_client_gone_before_its_answer_is_cancelled(engine, server):
    """Non-streamed: the client hangs up while its request waits (the scheduler is paused); the
    request is cancelled without producing a token."""
    before = metric(server, "pf_requests_total", status="cancelled")
    tokens = metric(server, "pf_generated_tokens_total")
    body = {"model": MID, "prompt": "wait for me", "max_tokens": 50, "temperature": 0}
    engine.scheduler().pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 20
        while not any(r.cancelled for r in engine.scheduler().waiting):
            assert time.monotonic() < deadline, "the abandoned request was not cancelled"
            time.sleep(0.05)
    finally:
        engine.scheduler().resume()
    deadline = time.monotonic() + 20
    while metric(server, "pf_requests_total", status="cancelled") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(server, "pf_generated_tokens_total") == tokens


def test_queue_full_timeouts_and_bad_requests(engine, server):
    c = server.client()
    sched = engine.scheduler()
    sched.pause()
    try:
        held = [sched.submit([5, 6, 7], _params(), None)
                for _ in range(sched.slots + 64)]          # every slot and queue place taken
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MID, prompt="hi", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"
        for r in held:
            r.cancel()
    finally:
        sched.resume()
    for r in held:
        assert r.result(timeout=30).finish_reason == "cancelled"
    bad = [({"model": "nope"}, "model"), ({"max_tokens": 0}, "max_tokens"),
           ({"temperature": 3}, "temperature"), ({"n": 0}, "n"), ({"stop": [1]}, "stop"),
           ({"persona": {"nobody": 1}}, "persona"), ({"persona": "/etc/passwd"}, "persona"),
           ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
           ({"messages": []}, "messages"), ({"seed": "x"}, "seed")]
    for extra, field in bad:
        body = {"model": MID, "messages": [{"role": "user", "content": "x"}], **extra}
        r = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], (extra, err)
    r = httpx.post(server.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def _params():
    from pf_engine.generation.sampling import SamplingParams
    return SamplingParams(max_new_tokens=2)


def test_timeout_and_api_key(engine):
    s = Server(build_app(engine, MID, api_key="sekret", timeout_s=0.3))
    try:
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}      # open without a key
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        c = s.client("sekret")
        engine.scheduler().pause()
        try:
            with pytest.raises(openai.APIStatusError) as e:
                c.completions.create(model=MID, prompt="hi", max_tokens=2)
            assert e.value.status_code == 504
        finally:
            engine.scheduler().resume()
        assert c.completions.create(model=MID, prompt="hi", max_tokens=2, temperature=0).choices[0].text \
            == offline(engine, "hi", None, 2, chat=False).text
    finally:
        s.close()
    with Server(build_app(engine, MID, max_queue=0)) as s:    # no queue: free slots still serve
        assert s.client().completions.create(model=MID, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_each_request_is_logged_in_one_line(engine, server, caplog):
    """pf-serve logs one line per request: its id, endpoint, model id, persona kind, status,
    token counts and milliseconds."""
    import logging
    c = server.client()
    with caplog.at_level(logging.INFO, logger="pf_engine.serve"):
        r = c.chat.completions.create(model=f"{MID}:auto", max_tokens=3, temperature=0,
                                      messages=[{"role": "user", "content": "Hi"}])
        for _ in c.completions.create(model=MID, prompt="the quick", max_tokens=2, stream=True):
            pass
        deadline = time.monotonic() + 10
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)               # the stream's line is written as its generator closes
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "pf_engine.serve"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{r.id} chat model={MID}:auto persona=sequence status=ok prompt=")
    assert "completion=3 ms=" in lines[0]
    assert " completions model=tiny persona=base status=ok " in lines[1] and "completion=2" in lines[1]


def test_metrics_parse(engine, server):
    from prometheus_client.parser import text_string_to_metric_families
    server.client().completions.create(model=f"{MID}:token", prompt="count", max_tokens=3, temperature=0)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("pf_requests", "pf_generated_tokens", "pf_queue_depth", "pf_running_requests",
                 "pf_tokens_per_second", "pf_time_to_first_token_seconds",
                 "pf_time_per_output_token_seconds"):
        assert name in fams, sorted(fams)
    assert metric(server, "pf_requests_total", persona_kind="token", status="ok") >= 1
    assert metric(server, "pf_time_to_first_token_seconds_count", persona_kind="token") >= 1
    assert torch.isfinite(torch.tensor(metric(server, "pf_tokens_per_second")))


MOOD = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "calm"]},
                                         "level": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "ok": {"type": "boolean"}},
        "required": ["mood", "level", "ok"], "additionalProperties": False}


def test_response_format_through_the_client(engine, server):
    """json_schema and json_object in chat and completions, streamed and not: every reply parses
    and validates; a schema the grammar library cannot compile is a 400 naming it."""
    import json
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    c = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD, "strict": True}}
    msgs = [{"role": "user", "content": "How are you?"}]
    r = c.chat.completions.create(model=MID, messages=msgs, max_tokens=60, temperature=0, response_format=rf)
    jsonschema.validate(json.loads(r.choices[0].message.content), MOOD)
    parts = c.chat.completions.create(model=f"{MID}:auto", messages=msgs, max_tokens=60, temperature=0.8,
                                      seed=3, response_format=rf, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices)
    jsonschema.validate(json.loads(text), MOOD)
    cr = c.completions.create(model=MID, prompt="mood:", max_tokens=60, temperature=0,
                              extra_body={"response_format": rf})
    jsonschema.validate(json.loads(cr.choices[0].text), MOOD)
    obj = c.chat.completions.create(model=MID, messages=msgs, max_tokens=60, temperature=0,
                                    response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason in ("stop", "length")
    broken = {"type": "json_schema", "json_schema": {"name": "broken", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MID, messages=msgs, max_tokens=5, response_format=broken)
    assert "'broken' cannot be compiled" in str(e.value) and e.value.body["param"] == "response_format"


def test_prefix_cache_metrics(engine, server):
    c = server.client()
    long = "tell me a story about a cat " * 3
    r = [c.completions.create(model=MID, prompt=long, max_tokens=2, temperature=0) for _ in range(2)]
    assert r[1].usage.prompt_tokens_details.cached_tokens >= 16 and r[0].choices[0].text == r[1].choices[0].text
    assert metric(server, "pf_prefix_cache_hits_total") >= 1
    assert metric(server, "pf_prefix_cache_hit_tokens_total") >= 16
    assert metric(server, "pf_prefix_cache_blocks") >= 1 and metric(server, "pf_prefix_cache_bytes") > 0
