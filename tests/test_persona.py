"""Persona experts through the engine: PEFT parity, mixing, backends, batching, routers, errors, CLI.

Offline, CPU, fp32, deterministic.  One tiny random Llama (conftest's ``hf_model_dir``) serves as
the base; PEFT LoRA adapters are made with ``get_peft_model(..., init_lora_weights=False)`` and
``save_pretrained`` once per module, and PEFT's own forward is the reference.
"""
import copy
import dataclasses
import json
import math
import os

import pytest
import torch

from pf_engine import Engine
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.cli.generate import main as generate_main
from pf_engine.model.config import MODULES, ModelConfig
from pf_engine.errors import LoadError, PFError, RequestError
from pf_engine.persona.router import SequenceRouter

PEFT_ATOL = 1e-4          # engine vs PEFT
ATOL = 1e-5               # engine vs engine (backends, batch vs alone)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKENDS = ("torch", "naive")


def _ids(B, T, seed, vocab=256):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# Fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(hf_model_dir):
    """(folder, transformers model, ModelConfig) of the tiny Llama every test here adapts."""
    folder, hf = hf_model_dir("llama", "persona_base")
    return folder, hf, ModelConfig.from_file(os.path.join(folder, "config.json"))


def make_peft(hf, folder, seed, **lora):
    """Save a random (nonzero A and B) PEFT LoRA adapter of a copy of ``hf`` into ``folder``."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(init_lora_weights=False, **lora))
    pm.save_pretrained(folder)
    return str(folder)


def peft_model(hf, dirs: dict):
    """A PeftModel on a fresh copy of ``hf`` holding every adapter of ``dirs`` {name: folder}."""
    from peft import PeftModel
    names = list(dirs)
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(dirs[n], adapter_name=n)
    return pm.eval()


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(ids).logits.float()


# 1. One expert at weight 1 == PEFT, ranks x rsLoRA x backends ------------------------------------
SINGLE = [(r, rs) for r in (4, 8, 16) for rs in (False, True)]
SINGLE_IDS = _ids(2, 13, seed=1)


@pytest.fixture(scope="module")
def single_experts(base, tmp_path_factory):
    """(rank, rslora) -> (bank file of that one PEFT expert, PEFT's logits on SINGLE_IDS)."""
    folder, hf, cfg = base
    root = tmp_path_factory.mktemp("persona_single")
    out = {}
    for r, rs in SINGLE:
        d = make_peft(hf, root / f"r{r}_{int(rs)}", seed=100 + r + rs, r=r, lora_alpha=1.5 * r,
                      use_rslora=rs, target_modules=ALL_LINEAR)
        bank = AdapterBank.from_peft(cfg, {"solo": d})
        path = str(root / f"r{r}_{int(rs)}.safetensors")
        bank.save(path)
        out[(r, rs)] = path, peft_logits(peft_model(hf, {"solo": d}), SINGLE_IDS)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank,rslora", SINGLE, ids=[f"r{r}-{'rslora' if s else 'lora'}"
                                                     for r, s in SINGLE])
def test_single_expert_weight_one_matches_peft(base, single_experts, rank, rslora, backend):
    folder, hf, _ = base
    path, ref = single_experts[(rank, rslora)]
    eng = Engine.from_pretrained(folder, adapters=path, backend=backend, progress=False, device="cpu", dtype="fp32")
    assert eng.bank.scalings == [1.5 * rank / (math.sqrt(rank) if rslora else rank)]
    ours = eng.logits(SINGLE_IDS, persona={"solo": 1.0})
    assert ours.dtype == torch.float32
    assert _maxdiff(ours, ref) <= PEFT_ATOL
    # the adapter really changes the output (the comparison above is not base vs base)
    with torch.no_grad():
        base_logits = hf(SINGLE_IDS).logits
    assert _maxdiff(ref, base_logits) > 1e-2
    assert _maxdiff(eng.logits(SINGLE_IDS), base_logits) <= PEFT_ATOL


# 2 + 3. Mixtures of experts with different ranks and target sets -------------------------------
MIX_SPECS = {   # name -> LoraConfig kwargs; the first one is not rsLoRA (PEFT's cat quirk)
    "warm": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "calm": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj",
                                                                      "gate_proj"]),
    "bold": dict(r=16, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
}
MIX_IDS = _ids(2, 11, seed=2)


@pytest.fixture(scope="module")
def mix_experts(base, tmp_path_factory):
    """(PEFT folders, bank from them, bank file, PeftModel holding all three)."""
    folder, hf, cfg = base
    root = tmp_path_factory.mktemp("persona_mix")
    dirs = {n: make_peft(hf, root / n, seed=200 + i, **spec)
            for i, (n, spec) in enumerate(MIX_SPECS.items())}
    bank = AdapterBank.from_peft(cfg, dirs)
    path = str(root / "mix.safetensors")
    bank.save(path)
    return dirs, bank, path, peft_model(hf, dirs)


@pytest.mark.parametrize("weights", [(0.6, 0.3, 1.5), (1.0, 1.0, 1.0), (0.25, 0.0, 2.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_mixture_matches_peft_cat(base, mix_experts, backend, weights):
    folder, hf, _ = base
    dirs, _, path, _ = mix_experts
    names = list(MIX_SPECS)
    pm = peft_model(hf, dirs)
    pm.add_weighted_adapter(names, list(weights), combination_type="cat", adapter_name="mix")
    pm.set_adapter("mix")
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["mix"] == 1.0
    ref = peft_logits(pm, MIX_IDS)
    eng = Engine.from_pretrained(folder, adapters=path, backend=backend, progress=False, device="cpu", dtype="fp32")
    persona = {n: w for n, w in zip(names, weights) if w}
    assert _maxdiff(eng.logits(MIX_IDS, persona=persona), ref) <= PEFT_ATOL
    # the same mixture in the CLI's string form
    s = ",".join(f"{n}={w}" for n, w in persona.items())
    assert _maxdiff(eng.logits(MIX_IDS, persona=s), ref) <= PEFT_ATOL


def test_bank_layout_excludes_experts_lacking_a_module(base, mix_experts):
    _, _, cfg = base
    _, bank, _, _ = mix_experts
    names = list(MIX_SPECS)
    want = {m: [k for k, n in enumerate(names)
                if f"{m}_proj" in MIX_SPECS[n]["target_modules"]] for m in MODULES}
    for l in range(cfg.num_hidden_layers):
        for m in MODULES:
            lw = bank.lora(l, m)
            assert lw is not None, (l, m)                 # every module is covered by someone
            assert lw.expert_ids.tolist() == want[m], (l, m)
            assert lw.rank == sum(bank.ranks[k] for k in want[m])
            assert set(lw.col_expert.tolist()) == set(want[m])
    assert bank.expert_modules(0) == ["q", "v", "up"]
    assert bank.expert_modules(1) == ["k", "o", "gate"]
    assert bank.expert_modules(2) == ["q", "down"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_with_different_targets_mix_correctly(base, mix_experts, backend):
    """Each expert alone equals PEFT with that adapter; all three at weight 1 equal PEFT with the
    three adapters active at once (PEFT adds each adapter's delta only where it has one)."""
    folder, _, _ = base
    _, _, path, pm = mix_experts
    names = list(MIX_SPECS)
    eng = Engine.from_pretrained(folder, adapters=path, backend=backend, progress=False, device="cpu", dtype="fp32")
    for n in names:
        pm.set_adapter(n)
        assert _maxdiff(eng.logits(MIX_IDS, persona={n: 1.0}), peft_logits(pm, MIX_IDS)) \
            <= PEFT_ATOL, n
    pm.base_model.set_adapter(names)                   # all three active together
    ref = peft_logits(pm, MIX_IDS)
    assert _maxdiff(eng.logits(MIX_IDS, persona={n: 1.0 for n in names}), ref) <= PEFT_ATOL
    # one request per expert in one batch, each equal to PEFT with its own adapter
    batch = eng.logits(MIX_IDS[:1].expand(3, -1), persona=[{n: 1.0} for n in names])
    for i, n in enumerate(names):
        pm.set_adapter(n)
        assert _maxdiff(batch[i:i + 1], peft_logits(pm, MIX_IDS[:1])) <= PEFT_ATOL, n


# 4. torch (grouped) and naive backends agree ----------------------------------------------------
RAGGED_RANKS = [2, 3, 4, 5, 6, 7, 8, 4, 2, 1]
RAGGED_MODULES = {n: list(MODULES) if i == 0 else [m for j, m in enumerate(MODULES) if (i + j) % 3]
                  for i, n in enumerate(BIG_FIVE)}    # expert 0 everywhere, the others 4-5 modules


@pytest.fixture(scope="module")
def random_banks(base, tmp_path_factory):
    """uniform: rank 8 on every module, from a file; ragged: per-expert ranks and target sets and
    both routers, passed as the object."""
    _, _, cfg = base
    root = tmp_path_factory.mktemp("persona_random")
    path = str(root / "uniform.safetensors")
    AdapterBank.random(cfg, rank=8, seed=7).save(path)
    ragged = AdapterBank.random(cfg, rank=RAGGED_RANKS, modules=RAGGED_MODULES, seed=8,
                                router=True)
    return {"uniform": path, "ragged": ragged}


@pytest.fixture(scope="module")
def backend_engines(base, random_banks):
    folder, _, _ = base
    return {(name, be): Engine.from_pretrained(folder, adapters=bank, backend=be, progress=False, device="cpu",
                                               dtype="fp32")
            for name, bank in random_banks.items() for be in BACKENDS}


DENSE = {n: 0.1 * (i + 1) for i, n in enumerate(BIG_FIVE)}
TOP2 = [{BIG_FIVE[0]: 0.7, BIG_FIVE[3]: 0.3}, {BIG_FIVE[4]: 0.5, BIG_FIVE[9]: 0.5},
        {BIG_FIVE[3]: 1.2, BIG_FIVE[6]: 0.4}]
CASES = {   # name -> (B, T, persona)
    "dense": (3, 9, DENSE),
    "top2": (3, 9, TOP2),
    "one_expert": (1, 6, {BIG_FIVE[6]: 1.0}),
    "zero_rows": (5, 7, [TOP2[0], None, DENSE, None, TOP2[2]]),
    "all_base": (3, 5, None),
    "one_token": (5, 1, [DENSE, None, TOP2[1], TOP2[0], {BIG_FIVE[2]: 2.0}]),
    "batch3_odd": (3, 8, [None, TOP2[1], DENSE]),
    "batch5_odd": (5, 8, [TOP2[0], TOP2[1], TOP2[2], DENSE, None]),
    "token": (3, 9, "token"),
    "token_mixed": (5, 6, ["token", None, TOP2[0], "token", DENSE]),
    "token_one_token": (3, 1, ["token", "token", None]),
}
TOKEN_CASES = {c for c in CASES if c.startswith("token")}
BACKEND_PARAMS = [(b, c) for b in ("uniform", "ragged") for c in CASES
                  if b == "ragged" or c not in TOKEN_CASES]


def test_cuda_backend_runs_parts_beyond_its_shared_memory_on_the_torch_path(base):
    """The cuda kernel holds h in 44 KiB of shared memory (704 rank rows): a part with more is
    routed to the torch backend's grouped GEMMs when the Linear is prepared (issue 33: it raised
    mid-forward).  Runs on CPU tensors: the fallback is plain torch."""
    from pf_engine.backends.grouped import Gathered
    from pf_engine.backends.kernels import Kernels, cuda_max_rank
    from pf_engine.persona.mix import Mix
    folder, _, _ = base
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    cuda = Kernels(torch.device("cpu"), "cuda")
    big = Engine.from_pretrained(folder, backend="torch", progress=False, adapters=AdapterBank.random(
        cfg, expert_names=["a", "b"], rank=[cuda_max_rank() - 7, 8], modules=["o"], seed=4))
    small = Engine.from_pretrained(folder, backend="torch", progress=False, adapters=AdapterBank.random(
        cfg, expert_names=["a", "b"], rank=[cuda_max_rank() - 8, 8], modules=["o"], seed=4))
    lin = next(l for l in big.model.blocks[0].linears if l.parts)
    assert cuda_max_rank() == 704 and isinstance(cuda.prepare(lin), Gathered)
    assert cuda.prepare(next(l for l in small.model.blocks[0].linears if l.parts)) is None
    x2 = torch.randn(5, lin.d_in, generator=torch.Generator().manual_seed(0))
    mix = Mix(torch.tensor([[0.7, 0.3]] * 5))
    want = big.backend.linear(lin, x2, mix, False)
    torch_state, lin.state = lin.state, cuda.prepare(lin)
    try:
        got = cuda.linear(lin, x2, mix, False)
    finally:
        lin.state = torch_state
    assert _maxdiff(got, want) <= ATOL


@pytest.mark.parametrize("bank,case", BACKEND_PARAMS, ids=[f"{b}-{c}" for b, c in BACKEND_PARAMS])
def test_naive_and_torch_backends_agree(backend_engines, bank, case):
    B, T, persona = CASES[case]
    ids = _ids(B, T, seed=3 + list(CASES).index(case))
    et, en = backend_engines[(bank, "torch")], backend_engines[(bank, "naive")]
    lt, ln = et.logits(ids, persona=persona), en.logits(ids, persona=persona)
    assert lt.shape == (B, T, 256)
    assert _maxdiff(lt, ln) <= ATOL
    if persona is not None:       # the experts did something (rows with a persona moved)
        base_logits = et.logits(ids)
        rows = [i for i in range(B) if (persona if not isinstance(persona, list) else persona[i])]
        assert _maxdiff(lt[rows], base_logits[rows]) > 1e-3
        zero = [i for i in range(B) if isinstance(persona, list) and persona[i] is None]
        if zero:                  # base-model rows of a mixed batch are exactly the base model
            assert _maxdiff(lt[zero], base_logits[zero]) <= ATOL


def test_backends_agree_on_generation_with_token_routing(backend_engines):
    prompts = [_ids(1, n, seed=40 + n)[0].tolist() for n in (4, 9, 6)]
    persona = ["token", TOP2[1], None]
    outs = {be: backend_engines[("ragged", be)].generate(prompts, max_new_tokens=6,
                                                         persona=persona) for be in BACKENDS}
    for a, b in zip(outs["torch"], outs["naive"]):
        assert a.token_ids == b.token_ids
        assert (a.gates is None) == (b.gates is None)
        if a.gates is not None:
            assert a.gates["kind"] == b.gates["kind"]
            assert a.gates["weights"].keys() == b.gates["weights"].keys()
            for k, w in a.gates["weights"].items():
                assert abs(w - b.gates["weights"][k]) <= 1e-5
    tg = outs["torch"][0].gates
    assert tg["kind"] == "token" and abs(sum(tg["weights"].values()) - 1) <= 1e-4


# 5. Mixed batch == each request alone -----------------------------------------------------------
BATCH_PERSONAS = {
    "explicit": [{BIG_FIVE[0]: 0.8, BIG_FIVE[7]: 0.4}, DENSE,
                 f"{BIG_FIVE[4]}=1.0,{BIG_FIVE[5]}=0.5", None],
    "routed": ["auto", None, "token", {BIG_FIVE[2]: 1.5}],
}


@pytest.fixture(scope="module")
def plain_engine(base):
    return Engine.from_pretrained(base[0], progress=False, device="cpu", dtype="fp32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", sorted(BATCH_PERSONAS))
def test_mixed_batch_equals_each_request_alone(backend_engines, plain_engine, which, backend):
    eng = backend_engines[("ragged", backend)]
    personas = BATCH_PERSONAS[which]
    prompts = [_ids(1, n, seed=60 + n)[0].tolist() for n in (5, 9, 3, 7)]   # left padding
    batch = eng.generate(prompts, max_new_tokens=8, persona=personas)
    base_i = personas.index(None)
    for i, (p, persona) in enumerate(zip(prompts, personas)):
        alone = eng.generate([p], max_new_tokens=8, persona=persona)[0]
        assert batch[i].token_ids == alone.token_ids, i
        assert batch[i].finish_reason == alone.finish_reason
        if persona is None:
            assert batch[i].gates is None and alone.gates is None
        else:
            assert batch[i].gates["kind"] == alone.gates["kind"]
            assert batch[i].gates["weights"].keys() == alone.gates["weights"].keys()
            for k, w in alone.gates["weights"].items():
                assert abs(batch[i].gates["weights"][k] - w) <= 1e-5
    # the base-only request equals an engine without adapters, token for token
    plain = plain_engine.generate([prompts[base_i]], max_new_tokens=8)[0]
    assert batch[base_i].token_ids == plain.token_ids
    # the personas do change what is generated for at least one request
    assert any(batch[i].token_ids != plain_engine.generate([p], max_new_tokens=8)[0].token_ids
               for i, p in enumerate(prompts) if i != base_i)

    ids = _ids(4, 10, seed=61)
    lb = eng.logits(ids, persona=personas)
    for i, persona in enumerate(personas):
        assert _maxdiff(lb[i:i + 1], eng.logits(ids[i:i + 1], persona=persona)) <= ATOL, i
    assert _maxdiff(lb[base_i:base_i + 1], plain_engine.logits(ids[base_i:base_i + 1])) <= ATOL


# 6. The router through the engine ---------------------------------------------------------------
SEQ_TOP_K = 3


@pytest.fixture(scope="module")
def routed(base, tmp_path_factory):
    """A bank whose sequence router reads decoder layer 1 with top-3; its file; engines on both."""
    folder, _, cfg = base
    bank = AdapterBank.random(cfg, rank=4, seed=9, router="sequence")
    bank.router = SequenceRouter.random(bank.num_experts, cfg.hidden_size, router_hidden=32,
                                        layer=1, temperature=0.5, top_k=SEQ_TOP_K, seed=10)
    path = str(tmp_path_factory.mktemp("persona_routed") / "routed.safetensors")
    bank.save(path)
    before = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
    after = Engine.from_pretrained(folder, adapters=path, progress=False, device="cpu", dtype="fp32")
    return bank, path, before, after


def test_auto_persona_uses_the_sequence_router(base, routed):
    _, hf, _ = base
    bank, _, eng, _ = routed
    prompts = [_ids(1, n, seed=80 + n)[0].tolist() for n in (6, 11)]
    first = eng.generate(prompts, max_new_tokens=5, persona="auto")
    second = eng.generate(prompts, max_new_tokens=5, persona="auto")
    for a, b in zip(first, second):                    # deterministic
        assert a.gates == b.gates and a.token_ids == b.token_ids
    for out, p in zip(first, prompts):
        g = out.gates
        assert g["kind"] == "sequence"
        assert len(g["weights"]) == SEQ_TOP_K           # top-k zeroes (and drops) the rest
        assert all(w > 0 for w in g["weights"].values())
        assert abs(sum(g["weights"].values()) - 1) <= 1e-5
        # the reference: the router applied to transformers' output of decoder layer 1
        with torch.no_grad():
            h = hf(torch.tensor([p]), output_hidden_states=True).hidden_states[1]
        ref = bank.router(h)[0]
        assert int((ref > 0).sum()) == SEQ_TOP_K
        want = {n: float(w) for n, w in zip(bank.expert_names, ref) if w > 0}
        assert g["weights"].keys() == want.keys()
        for n, w in want.items():
            assert abs(g["weights"][n] - w) <= 1e-5
        # "auto" == those gates given explicitly
        ids = torch.tensor([p])
        assert _maxdiff(eng.logits(ids, persona="auto"), eng.logits(ids, persona=want)) <= ATOL
    # a batch of different prompts routes each prompt on its own
    assert first[0].gates != first[1].gates


def test_router_round_trips_through_the_bank_file(routed):
    bank, path, before, after = routed
    back = AdapterBank.load(path)
    assert back.router.config() == bank.router.config()
    for k, t in bank.router.tensors().items():
        assert torch.equal(back.router.tensors()[k], t), k
    prompts = [_ids(1, n, seed=90 + n)[0].tolist() for n in (4, 8)]
    ob = before.generate(prompts, max_new_tokens=6, persona="auto")
    oa = after.generate(prompts, max_new_tokens=6, persona="auto")
    assert [o.token_ids for o in ob] == [o.token_ids for o in oa]
    assert [o.gates for o in ob] == [o.gates for o in oa]
    ids = _ids(2, 8, seed=91)
    assert torch.equal(before.logits(ids, persona="auto"), after.logits(ids, persona="auto"))


def test_auto_without_router_weights_is_refused(base, random_banks):
    folder, _, _ = base
    eng = Engine.from_pretrained(folder, adapters=random_banks["uniform"], progress=False, device="cpu", dtype="fp32")
    assert eng.bank.router is None and eng.bank.token_router is None
    for call in (lambda: eng.logits([[5, 6, 7]], persona="auto"),
                 lambda: eng.generate([[5, 6, 7]], max_new_tokens=2, persona="auto"),
                 lambda: eng.generate([[5, 6], [7, 8]], max_new_tokens=2,
                                      persona=[None, "auto"])):
        with pytest.raises(PFError, match="no sequence router.*explicit persona weights"):
            call()
    with pytest.raises(PFError, match="no token router"):
        eng.logits([[5, 6, 7]], persona="token")


def test_auto_with_only_a_token_router_routes_per_token(base):
    folder, _, cfg = base
    bank = AdapterBank.random(cfg, rank=4, seed=12, router="token")
    eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
    out = eng.generate([[5, 9, 11, 40]], max_new_tokens=4, persona="auto")[0]
    assert out.gates["kind"] == "token"
    assert abs(sum(out.gates["weights"].values()) - 1) <= 1e-4
    ids = torch.tensor([[5, 9, 11, 40]])
    assert torch.equal(eng.logits(ids, persona="auto"), eng.logits(ids, persona="token"))


# 7. Bad input: clear errors ---------------------------------------------------------------------
OTHER_MODELS = {   # config change -> (PFError subclass for a file, words its message must hold)
    "hidden_size": (dict(hidden_size=32), r"hidden_size is 32 in the bank, 64 in the model"),
    "layers": (dict(num_hidden_layers=3), r"num_hidden_layers is 3 in the bank, 2 in the model"),
    "fewer_layers": (dict(num_hidden_layers=1),
                     r"num_hidden_layers is 1 in the bank, 2 in the model"),
    "intermediate": (dict(intermediate_size=96),
                     r"layers\.0\.gate\.b \(gate\) has shape \[96, 40\], expected \[128, 40\]"),
}


@pytest.mark.parametrize("kind", sorted(OTHER_MODELS))
def test_bank_file_for_another_model_is_refused(base, tmp_path, kind):
    folder, _, cfg = base
    change, pattern = OTHER_MODELS[kind]
    path = str(tmp_path / "other.safetensors")
    AdapterBank.random(dataclasses.replace(cfg, **change), rank=4, seed=0).save(path)
    with pytest.raises(LoadError, match=pattern):
        Engine.from_pretrained(folder, adapters=path, progress=False, device="cpu", dtype="fp32")


# the field (or module) named, and both values
OBJECT_PATTERNS = {"hidden_size": ("hidden_size", "32", "64"),
                   "layers": ("num_hidden_layers", "3", "2"),
                   "fewer_layers": ("num_hidden_layers", "1", "2"),
                   "intermediate": ("gate", "96", "128")}


@pytest.mark.parametrize("kind", sorted(OTHER_MODELS))
def test_bank_object_for_another_model_is_refused(base, kind):
    """The same check when the AdapterBank is passed as an object (not a path)."""
    folder, _, cfg = base
    change, _ = OTHER_MODELS[kind]
    bank = AdapterBank.random(dataclasses.replace(cfg, **change), rank=4, seed=0)
    with pytest.raises(PFError) as err:
        eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
        eng.logits([[5, 6, 7]], persona={BIG_FIVE[0]: 1.0})   # (it must not get this far)
    msg = str(err.value)
    for word in OBJECT_PATTERNS[kind]:
        assert word in msg, (word, msg)


@pytest.fixture(scope="module")
def uniform_engine(base, random_banks):
    return Engine.from_pretrained(base[0], adapters=random_banks["uniform"], progress=False, device="cpu", dtype="fp32")


BAD_PERSONAS = [
    ({"nobody": 1.0}, r"unknown expert 'nobody'; this bank's experts are: openness\+, "
                      r"openness-, .*neuroticism-"),
    ("nobody=1", r"unknown expert 'nobody'; this bank's experts are: openness\+"),
    ({BIG_FIVE[0]: float("nan")}, r"weight of expert 'openness\+' must be finite and >= 0, got nan"),
    (f"{BIG_FIVE[0]}=nan", r"must be finite and >= 0, got nan"),
    ({BIG_FIVE[0]: float("inf")}, r"must be finite and >= 0, got inf"),
    ({BIG_FIVE[0]: -float("inf")}, r"must be finite and >= 0, got -inf"),
    (f"{BIG_FIVE[1]}=inf", r"must be finite and >= 0, got inf"),
    ({BIG_FIVE[0]: 0.5, BIG_FIVE[1]: -0.1}, r"'openness-' must be finite and >= 0, got -0\.1"),
    (f"{BIG_FIVE[1]}=-1", r"must be finite and >= 0, got -1\.0"),
    ({BIG_FIVE[0]: 0.0, BIG_FIVE[1]: 0}, r"persona weights are all zero"),
    (f"{BIG_FIVE[0]}=0", r"persona weights are all zero"),
    ({}, r"persona is empty"),
    ({BIG_FIVE[0]: "0.5"}, r"must be a number"),
    ({BIG_FIVE[0]: True}, r"must be a number"),
    (f"{BIG_FIVE[0]}=abc", r"bad persona .*'abc'.* is not a number"),
    ("=0.5", r"is not NAME=WEIGHT"),
    (3, r"expected None, a dict of weights, 'auto' or 'token'"),
]


@pytest.mark.parametrize("persona,pattern", BAD_PERSONAS, ids=[repr(p) for p, _ in BAD_PERSONAS])
def test_bad_persona_weights_are_refused(uniform_engine, persona, pattern):
    with pytest.raises(RequestError, match=pattern):
        uniform_engine.logits([[5, 6, 7]], persona=persona)
    with pytest.raises(RequestError, match=pattern):
        uniform_engine.generate([[5, 6, 7]], max_new_tokens=2, persona=persona)
    with pytest.raises(RequestError, match=pattern):   # one bad row spoils the batch
        uniform_engine.generate([[5, 6], [7, 8]], max_new_tokens=2, persona=[None, persona])


def test_persona_without_a_bank_is_refused(plain_engine):
    for persona in ({BIG_FIVE[0]: 1.0}, "auto", "token", f"{BIG_FIVE[0]}=1", [None, "auto"]):
        with pytest.raises(RequestError, match=r"persona given but this engine has no adapter "
                                               r"bank \(load one with adapters=BANK"):
            plain_engine.generate([[5, 6], [7, 8]], max_new_tokens=2, persona=persona)
    with pytest.raises(RequestError, match="no adapter bank"):
        plain_engine.logits([[5, 6, 7]], persona={BIG_FIVE[0]: 1.0})
    # None (or a list of Nones) is the base model and fine
    assert plain_engine.generate([[5, 6]], max_new_tokens=2, persona=[None])[0].gates is None


def test_wrong_number_of_personas_is_refused(uniform_engine):
    p = {BIG_FIVE[0]: 1.0}
    with pytest.raises(RequestError, match=r"got 2 specs for 3 prompts; expected one for all or "
                                           r"one per prompt"):
        uniform_engine.generate([[5, 6], [7, 8], [9]], max_new_tokens=2, persona=[p, p])
    with pytest.raises(RequestError, match=r"got 3 specs for 1 prompts"):
        uniform_engine.generate([5, 6, 7], max_new_tokens=2, persona=[p, None, p])
    with pytest.raises(RequestError, match=r"got 1 specs for 2 prompts"):
        uniform_engine.logits([[5, 6], [7, 8]], persona=[p])


# 8. pf-generate with a bank ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_bank(tiny_chat_model, tmp_path_factory):
    folder, _ = tiny_chat_model
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    path = str(tmp_path_factory.mktemp("persona_cli") / "xy.safetensors")
    AdapterBank.random(cfg, expert_names=["x", "y"], rank=4, seed=5).save(path)
    return folder, path


def test_cli_generate_with_persona(chat_bank, capsys):
    folder, bank = chat_bank
    prompts = ["the quick brown fox", "hello world"]
    rc = generate_main(prompts + ["--model", folder, "--adapters", bank, "--persona",
                                  "x=0.5,y=0.5", "--json", "--max-new-tokens", "4", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert len(lines) == 2
    eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
    api = eng.generate(prompts, max_new_tokens=4, persona={"x": 0.5, "y": 0.5})
    for ln, o in zip(lines, api):
        assert ln["gates"] == {"kind": "explicit", "weights": {"x": 0.5, "y": 0.5}, "strength": 1.0}
        assert ln["token_ids"] == o.token_ids and ln["text"] == o.text
        assert 1 <= len(ln["token_ids"]) <= 4


@pytest.mark.parametrize("persona,words", [
    ("x=abc", "bad persona 'x=abc': weight 'abc' of 'x' is not a number"),
    ("x=0.5,,y=1", "is not NAME=WEIGHT"),
    ("z=1", "unknown expert 'z'; this bank's experts are: x, y"),
    ("x=-1", "must be finite and >= 0"),
    ("x=0,y=0", "persona weights are all zero"),
    ("auto", "this bank has no sequence router"),
])
def test_cli_bad_persona_is_one_line_exit_2(chat_bank, capsys, persona, words):
    folder, bank = chat_bank
    rc = generate_main(["hello", "--model", folder, "--adapters", bank, "--persona", persona,
                        "--json", "--max-new-tokens", "4", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("pf-generate: error: "), err
    assert words in err


def test_cli_persona_without_adapters_exit_2(chat_bank, capsys):
    folder, _ = chat_bank
    rc = generate_main(["hello", "--model", folder, "--persona", "x=1", "--json",
                        "--max-new-tokens", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "no adapter bank" in err
