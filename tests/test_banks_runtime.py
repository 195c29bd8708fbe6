"""Banks and experts changed at run time (issue 39; pf_engine/runtime/banks.py, persona/bank_edit.py):
each change gives what an engine built with the new bank gives, requests in flight refuse it,
the prefix cache never serves KV of a replaced expert, the old bank's memory goes, and the
expert edits against a bank assembled directly."""
import gc
import weakref

import pytest
import torch

from pf_engine import Engine, RequestError
from pf_engine.model.config import ModelConfig
from pf_engine.persona import bank_edit
from pf_engine.persona.bank import AdapterBank

PROMPT = "Tell me about the sea and the sky"


@pytest.fixture(scope="module")
def cfg(tiny_chat_model):
    return ModelConfig.from_file(f"{tiny_chat_model[0]}/config.json")


def engine(folder, bank, **kw):
    e = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", **kw)
    e.new_scheduler(slots=4, max_len=128, background=False)
    return e


def tokens(e, persona, n=12):
    return e.generate(PROMPT, max_new_tokens=n, persona=persona)[0].token_ids


def test_split_and_assemble_give_the_same_bank(cfg):
    bank = AdapterBank.random(cfg, rank=[2, 3, 4, 2, 3, 4, 2, 3, 4, 5], seed=1,
                              modules={"openness+": ["q"], "openness-": ["down", "v"]})
    again = bank_edit.assemble(bank, bank_edit.split(bank), keep_routers=True)
    assert again.digest == bank.digest and again.expert_names == bank.expert_names


def test_replace_add_and_remove_an_expert(cfg):
    a = AdapterBank.random(cfg, ["x", "y", "z"], rank=[2, 3, 4], seed=2, router=True)
    b = AdapterBank.random(cfg, ["x", "y", "z"], rank=[2, 5, 4], seed=3)
    y2 = bank_edit.split(b)[1]
    replaced = bank_edit.with_expert(a, y2)
    assert replaced.ranks == [2, 5, 4] and replaced.router is a.router      # K kept: routers too
    want = AdapterBank.random(cfg, ["x", "y", "z"], rank=[2, 3, 4], seed=2)
    for (l, m), (wa, wb) in replaced._weights.items():
        ka, kb = want._weights[(l, m)]
        ya, yb = b._weights[(l, m)]
        assert torch.equal(wa[:2], ka[:2]) and torch.equal(wa[2:7], ya[2:7])
        assert torch.equal(wb[:, 7:], kb[:, 5:])
    y2.name = "w"
    added = bank_edit.with_expert(a, y2)
    assert added.expert_names == ["x", "y", "z", "w"] and added.router is None
    removed = bank_edit.without_expert(a, "y")
    assert removed.expert_names == ["x", "z"] and removed.ranks == [2, 4]
    with pytest.raises(Exception, match="no expert 'q'; this bank's experts are: x, y, z"):
        bank_edit.without_expert(a, "q")


@pytest.mark.parametrize("kw", [dict(dtype="fp32"), dict(quantize="q4")], ids=["fp32", "q4"])
def test_each_change_equals_an_engine_built_with_it(tiny_chat_model, cfg, kw):
    folder = tiny_chat_model[0]
    one = AdapterBank.random(cfg, ["a", "b"], rank=4, seed=5)
    two = AdapterBank.random(cfg, ["a", "b"], rank=4, seed=6)
    e = engine(folder, one, **kw)
    before = tokens(e, {"a": 1.0})
    e.load_bank(two)                                    # same names: the cache key must differ
    assert tokens(e, {"a": 1.0}) == tokens(engine(folder, two, **kw), {"a": 1.0}) != before
    e.load_expert("a", _bank_file(one, folder, "one.pfbank"))      # a from bank one again
    mixed = bank_edit.with_expert(two, bank_edit.split(one)[0])
    assert tokens(e, {"a": 1.0, "b": 0.5}) == tokens(engine(folder, mixed, **kw), {"a": 1.0, "b": 0.5})
    e.unload_expert("b")
    assert e.bank.expert_names == ["a"] and tokens(e, {"a": 1.0}) == before
    e.unload_bank()
    assert e.bank is None and tokens(e, None) == tokens(engine(folder, None, **kw), None)
    with pytest.raises(Exception, match="persona given but this engine has no adapter bank"):
        tokens(e, {"a": 1.0})


def test_a_change_waits_for_no_request_and_refuses_under_one(tiny_chat_model, cfg):
    e = engine(tiny_chat_model[0], AdapterBank.random(cfg, ["a", "b"], rank=4, seed=5))
    req = e.submit(PROMPT, max_new_tokens=8, persona={"a": 1.0})
    with pytest.raises(RequestError, match="requests are in flight"):
        e.unload_bank()
    assert req.result().token_ids and e.bank is not None        # untouched, and it finished
    e.unload_bank()


def test_the_old_bank_is_freed(tiny_chat_model, cfg):
    e = engine(tiny_chat_model[0], AdapterBank.random(cfg, ["a", "b"], rank=8, seed=7))
    tokens(e, {"a": 1.0})
    ref = weakref.ref(e.bank)
    e.load_bank(AdapterBank.random(cfg, ["c"], rank=2, seed=8))
    gc.collect()
    assert ref() is None


def test_bad_files_are_one_error_and_keep_the_bank(tiny_chat_model, cfg, tmp_path):
    e = engine(tiny_chat_model[0], AdapterBank.random(cfg, ["a", "b"], rank=4, seed=5))
    digest = e.bank.digest
    junk = tmp_path / "junk.pfbank"
    junk.write_bytes(b"not a bank")
    with pytest.raises(Exception, match=str(junk)):
        e.load_bank(junk)
    with pytest.raises(Exception, match="no expert 'zz'"):
        e.unload_expert("zz")
    assert e.bank.digest == digest


def _bank_file(bank, folder, name):
    import tempfile
    path = f"{tempfile.mkdtemp()}/{name}"
    bank.save(path)
    return path


def test_the_prefix_cache_key_is_the_banks_content(cfg):
    from pf_engine.persona.specs import Personas
    from pf_engine.runtime.prefix_cache import persona_root

    class Req:
        def __init__(self, bank):
            self.personas = Personas(bank, [{"a": 1.0}], 1)
            self.kind = self.personas.kinds[0]
    one = AdapterBank.random(cfg, ["a", "b"], rank=4, seed=5)
    same = bank_edit.assemble(one, bank_edit.split(one), keep_routers=True)
    other = AdapterBank.random(cfg, ["a", "b"], rank=4, seed=6)
    assert persona_root(Req(one)) == persona_root(Req(same)) != persona_root(Req(other))
