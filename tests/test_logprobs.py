"""Logprobs, echo, scoring, n > 1, batched and token-id prompts, the tokenizer endpoints.

References: ``Engine.logits``' log-softmax at each position (one prompt per forward, no
padding), and ``Engine.generate`` with the same seeds, through the real ``openai`` client
against pf-serve on 127.0.0.1.  A tiny random chat model with a random bank (both routers).
"""
import json

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from pf_engine import Engine  # noqa: E402
from pf_engine.errors import RequestError  # noqa: E402
from pf_engine.model.config import ModelConfig  # noqa: E402
from pf_engine.persona.bank import BIG_FIVE, AdapterBank  # noqa: E402
from pf_engine.serve import build_app  # noqa: E402
from pf_engine.serve.threaded import ThreadedServer  # noqa: E402

MID = "tiny"
PERSONAS = [None, {BIG_FIVE[2]: 0.6, BIG_FIVE[7]: 0.4}, "auto", "token"]
TEXTS = ["Once upon a time", "The weather today is rather", "Hi"]


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    folder, _ = tiny_chat_model
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=4, seed=11, router=True)
    eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
    eng.new_scheduler(slots=8, max_len=128)
    return eng


@pytest.fixture(scope="module")
def server(engine):
    s = ThreadedServer(build_app(engine, MID, max_queue=64, timeout_s=60))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ref_logprobs(engine, ids, persona):
    """fp32 log-softmax of Engine.logits for one unpadded sequence: [T, V]."""
    return torch.log_softmax(engine.logits([ids], persona=persona)[0].double(), -1)


def ids_of(engine, text):
    return engine.tokenizer.hf.encode(text)


# Engine ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("persona", PERSONAS)
def test_score_equals_log_softmax_of_logits(engine, persona):
    prompts = [ids_of(engine, t) for t in TEXTS]
    got = engine.score(prompts, persona=persona, top_logprobs=3)
    got_small = engine.score(prompts, persona=persona, top_logprobs=3)
    for ids, rows in zip(prompts, got):
        ref = ref_logprobs(engine, ids, persona)
        assert rows[0] is None and len(rows) == len(ids)
        for t in range(1, len(ids)):
            e = rows[t]
            assert e.token_id == ids[t]
            assert e.logprob == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
            v, i = ref[t - 1].topk(3)
            assert [k for k, _ in e.top] == i.tolist()
            assert [lp for _, lp in e.top] == pytest.approx(v.tolist(), abs=1e-4)
    assert got == got_small                                   # deterministic


def test_score_chunks_padding_and_errors(engine):
    """Prompts split over many chunks (tiny budget) score as in one batch."""
    from pf_engine.generation.scoring import score
    prompts = [ids_of(engine, t) for t in TEXTS] * 2
    whole = score(engine, prompts, "auto", 2)
    chunked = score(engine, prompts, "auto", 2, chunk_tokens=4)
    for a, b in zip(whole, chunked):
        assert [x and x.token_id for x in a] == [x and x.token_id for x in b]
        assert [x.logprob for x in a[1:]] == pytest.approx([x.logprob for x in b[1:]], abs=1e-4)
    for bad, pattern in (([], "non-empty list"), ([[1, -1]], r"prompts\[0\]"),
                         ([[1]], None)):
        if pattern is None:
            assert engine.score(bad) == [[None]]
            continue
        with pytest.raises(RequestError, match=pattern):
            engine.score(bad)
    with pytest.raises(RequestError, match="top_logprobs"):
        engine.score([[1, 2]], top_logprobs=21)


@pytest.mark.parametrize("persona", [None, PERSONAS[1], "auto"])
def test_generated_logprobs_are_the_models_log_softmax(engine, persona):
    """Each sampled token's logprob is the log-softmax of the logits it was sampled from (before
    temperature and repetition penalty), at every step."""
    prompt = ids_of(engine, TEXTS[0])
    out = engine.generate([prompt], max_new_tokens=6, persona=persona, temperature=0.8, seed=3,
                          repetition_penalty=1.3, logprobs=2)[0]
    assert len(out.logprobs) == len(out.token_ids)
    seq = prompt + out.token_ids          # auto read the prompt alone: the same gates, explicit
    ref = ref_logprobs(engine, seq, out.gates["weights"] if persona == "auto" else persona)
    for i, e in enumerate(out.logprobs):
        pos = len(prompt) + i - 1
        assert e.token_id == out.token_ids[i]
        assert e.logprob == pytest.approx(float(ref[pos, e.token_id]), abs=1e-4)
        assert [k for k, _ in e.top] == ref[pos].topk(2).indices.tolist()
    assert engine.generate([prompt], max_new_tokens=2)[0].logprobs is None


# pf-serve ----------------------------------------------------------------------------------------
def test_completion_logprobs_and_echo_through_openai(engine, client):
    prompt = ids_of(engine, TEXTS[1])
    for persona in (None, PERSONAS[1]):
        want = engine.generate([prompt], max_new_tokens=5, temperature=0, persona=persona,
                               logprobs=3)[0]
        r = client.completions.create(model=MID, prompt=TEXTS[1], max_tokens=5, temperature=0,
                                      logprobs=3, echo=True, extra_body={"persona": persona})
        lp = r.choices[0].logprobs
        n = len(prompt)
        assert r.choices[0].text == TEXTS[1] + want.text
        assert len(lp.tokens) == n + len(want.token_ids) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        scored = engine.score([prompt], persona=persona, top_logprobs=3)[0]
        assert lp.token_logprobs[1:n] == pytest.approx([e.logprob for e in scored[1:]], abs=1e-4)
        assert lp.token_logprobs[n:] == pytest.approx([e.logprob for e in want.logprobs],
                                                      abs=1e-4)
        for top, e in zip(lp.top_logprobs[n:], want.logprobs):
            assert max(top.values()) == pytest.approx(e.top[0][1], abs=1e-4)
            # the top 3 and the chosen one (keys are token strings: two tokens may share one)
            allowed = [lp for _, lp in e.top] + [e.logprob]
            assert all(min(abs(v - a) for a in allowed) < 1e-4 for v in top.values())
            assert 1 <= len(top) <= 4
        # the offsets index the returned text, and the token strings spell it
        assert "".join(lp.tokens) == r.choices[0].text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_lm_eval_style_batched_token_id_scoring(engine, client, server):
    """What lm-evaluation-harness' local-completions sends: token-id prompts, several per
    request, echo, logprobs 1, max_tokens 1 (and 0: the prompt alone)."""
    prompts = [ids_of(engine, t) for t in TEXTS]
    for max_tokens in (0, 1):
        r = client.completions.create(model=f"{MID}:auto", prompt=prompts, max_tokens=max_tokens,
                                      temperature=0, logprobs=1, echo=True)
        assert [c.index for c in r.choices] == [0, 1, 2]
        scored = engine.score(prompts, persona="auto", top_logprobs=1)
        for c, ids, ref in zip(r.choices, prompts, scored):
            lp = c.logprobs
            assert len(lp.token_logprobs) == len(ids) + max_tokens
            assert lp.token_logprobs[1:len(ids)] == pytest.approx(
                [e.logprob for e in ref[1:]], abs=1e-4)
            assert c.model_extra["persona"]["kind"] == "sequence"
        assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
        assert r.usage.completion_tokens == max_tokens * len(prompts)
    sched = engine.scheduler()
    sched.pause()                          # scoring alone needs no decode slot: it is answered
    try:
        r = client.completions.create(model=MID, prompt=prompts[0], max_tokens=0, echo=True,
                                      logprobs=0)
        assert r.choices[0].text == engine.tokenizer.decode(prompts[0])
        assert r.choices[0].logprobs.top_logprobs[1] and r.usage.completion_tokens == 0
        r = client.completions.create(model=MID, prompt=prompts[0], max_tokens=0, logprobs=1)
        assert r.choices[0].text == "" and r.choices[0].logprobs.tokens == []
    finally:
        sched.resume()


def test_n_choices_follow_the_seed_rule(engine, client):
    r = client.completions.create(model=MID, prompt=TEXTS[0], max_tokens=6, temperature=1.0,
                                  n=3, seed=40)
    for c in r.choices:
        want = engine.generate([TEXTS[0]], max_new_tokens=6, temperature=1.0, seed=40 + c.index)
        assert c.text == want[0].text
    assert len({c.text for c in r.choices}) > 1
    two = client.completions.create(model=MID, prompt=[TEXTS[0], TEXTS[1]], max_tokens=4,
                                    temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text != two.choices[2].text == two.choices[3].text
    best = client.completions.create(model=MID, prompt=TEXTS[0], max_tokens=6, temperature=1.0,
                                     n=1, best_of=3, seed=40, logprobs=0)
    cands = [engine.generate([TEXTS[0]], max_new_tokens=6, temperature=1.0, seed=40 + i,
                             logprobs=0)[0] for i in range(3)]
    top = max(cands, key=lambda o: sum(e.logprob for e in o.logprobs) / len(o.logprobs))
    assert best.choices[0].text == top.text
    assert best.usage.completion_tokens == sum(len(o.token_ids) for o in cands)


def test_chat_logprobs_streamed_and_not(engine, client):
    msgs = [{"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model=f"{MID}:{BIG_FIVE[1]}", messages=msgs, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2, n=2)
    ids = engine.tokenizer.encode_chat(msgs)
    want = engine.generate([ids], max_new_tokens=6, temperature=0, persona={BIG_FIVE[1]: 1.0},
                           logprobs=2, **{k: v for k, v in engine.generation_defaults(True)[0]
                                          .items() if k == "repetition_penalty"})[0]
    assert [c.message.content for c in r.choices] == [want.text] * 2
    content = r.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx([e.logprob for e in want.logprobs],
                                                         abs=1e-4)
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)
    stream = client.chat.completions.create(model=f"{MID}:{BIG_FIVE[1]}", messages=msgs,
                                            max_tokens=6, temperature=0, logprobs=True,
                                            top_logprobs=2, n=2, stream=True)
    per = {0: [], 1: []}
    text = {0: "", 1: ""}
    for ch in stream:
        for c in ch.choices:
            text[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                per[c.index] += [t.logprob for t in c.logprobs.content]
    assert text == {0: want.text, 1: want.text}
    assert per[0] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4) and \
        per[1] == per[0]


def test_streamed_completions_with_n_and_echo(engine, client):
    stream = client.completions.create(model=MID, prompt=[TEXTS[0], TEXTS[2]], max_tokens=4,
                                       temperature=0, n=2, echo=True, stream=True,
                                       stream_options={"include_usage": True})
    text, finish = {}, {}
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    for i, t in enumerate([TEXTS[0], TEXTS[0], TEXTS[2], TEXTS[2]]):
        want = engine.generate([t], max_new_tokens=4, temperature=0)[0]
        assert text[i] == t + want.text and i in finish
    assert chunks[-1].usage.completion_tokens == sum(
        len(engine.generate([t], max_new_tokens=4, temperature=0)[0].token_ids)
        for t in (TEXTS[0], TEXTS[0], TEXTS[2], TEXTS[2]))


@pytest.mark.parametrize("path,extra,param", [
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"n": 2, "best_of": 1}, "best_of"),
    ("completions", {"best_of": 3, "stream": True}, "best_of"),
    ("completions", {"echo": "yes"}, "echo"),
    ("completions", {"prompt": [[1, 2], "x", []]}, "prompt[2]"),
    ("completions", {"prompt": [[1] * 5] * 65}, "prompt"),
    ("completions", {"n": 129}, "n"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": 1}, "logprobs"),
    ("chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("chat/completions", {"n": 0}, "n"),
])
def test_bad_fields_are_named(server, path, extra, param):
    body = {"model": MID, "prompt": "x"} if path == "completions" else \
        {"model": MID, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{server.url}/v1/{path}", json={**body, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split("[")[0] in err["message"], err


def test_tokenizer_endpoints(engine, server):
    hf = engine.tokenizer.hf
    r = httpx.post(server.url + "/tokenize", json={"prompt": TEXTS[1]}).json()
    assert r == {"tokens": hf.encode(TEXTS[1]), "count": len(hf.encode(TEXTS[1])),
                 "max_model_len": engine.config.max_position_embeddings}
    msgs = [{"role": "user", "content": "hello"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == engine.tokenizer.encode_chat(msgs)
    back = httpx.post(server.url + "/detokenize", json={"tokens": hf.encode(TEXTS[1])}).json()
    assert back == {"prompt": hf.decode(hf.encode(TEXTS[1]))}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token_id"] == hf.eos_token_id and info["chat_template"] == hf.chat_template
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, -2]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(server.url + "/tokenize", content=json.dumps([1]))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "body"
