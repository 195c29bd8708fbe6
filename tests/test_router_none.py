"""A sequence router with a "none" output through Engine, the scheduler and pf-serve: the gates
sum to the strength 1 - p_none, "auto" equals those gates given explicitly, and every surface
reports the same gates with their strength.

Offline, CPU, fp32: a tiny random chat model and a random bank whose router reads layer 1.
"""
import pytest
import torch

from pf_engine import Engine
from pf_engine.model.config import ModelConfig
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.persona.router import SequenceRouter
from pf_engine.persona.specs import Personas
from pf_engine.generation.sampling import SamplingParams

MID = "tiny"
PROMPTS = ["What is 17 times 23?", "My dog died this morning and I can't stop crying."]


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    folder, _ = tiny_chat_model
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=4, seed=31)
    r = SequenceRouter.random(len(BIG_FIVE), cfg.hidden_size, router_hidden=16, layer=1,
                              top_k=2, seed=32, none=True)
    r.b2[-1] += 1.0                     # a sizeable none share, still different per prompt
    bank.router = r
    return Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu",
                                  dtype="fp32")


def test_auto_gates_carry_the_strength_and_equal_explicit_weights(engine):
    outs = engine.generate(PROMPTS, max_new_tokens=4, persona="auto", chat=True, temperature=0)
    strengths = []
    for text, out in zip(PROMPTS, outs):
        g = out.gates
        assert g["kind"] == "sequence" and len(g["weights"]) == 2
        assert g["strength"] == pytest.approx(sum(g["weights"].values()), abs=1e-5)
        assert 0.05 < g["strength"] < 0.95            # the none share is taken off the mix
        strengths.append(g["strength"])
        # the reference: the router on the base model's layer-1 states of the chat prompt
        p = Personas(engine.bank, ["auto"], 1)
        p.route(engine.model, torch.tensor([engine.tokenizer.encode(text, chat=True)]))
        assert float(p.rows[0].sum()) == pytest.approx(g["strength"], abs=1e-5)
        ids = torch.tensor([engine.tokenizer.encode(text, chat=True)])
        assert torch.allclose(engine.logits(ids, persona="auto"),
                              engine.logits(ids, persona=g["weights"]), atol=1e-4)
    assert strengths[0] != strengths[1]               # read from each prompt


def test_none_gates_through_the_scheduler(engine):
    ids = [engine.tokenizer.encode(p, chat=True) for p in PROMPTS]
    sched = engine.new_scheduler(slots=2, max_len=64, background=False)
    reqs = [sched.submit(i, SamplingParams(max_new_tokens=3), "auto") for i in ids]
    while sched.pending():
        sched.step()
    offline = engine.generate(ids, max_new_tokens=3, persona="auto", temperature=0)
    for r, o in zip(reqs, offline):
        got = r.output()
        assert got.gates == o.gates and got.token_ids == o.token_ids
        assert got.gates["strength"] < 0.95


def test_none_gates_through_pf_serve(engine):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    eng = engine
    eng.new_scheduler(slots=4, max_len=128)
    server = ThreadedServer(build_app(eng, MID, max_queue=8, timeout_s=60))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        for text in PROMPTS:
            want = eng.generate([text], max_new_tokens=4, persona="auto", chat=True,
                                temperature=0)[0]
            r = c.chat.completions.create(model=f"{MID}:auto", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": text}])
            assert r.model_extra["persona"] == want.gates
            assert r.model_extra["persona"]["strength"] < 0.95
    finally:
        server.close()
