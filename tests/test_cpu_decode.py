"""pf_engine/backends/cpu/decode.py: a block's decode step in csrc/cpu calls (rmsnorm and silu-mul
prologues, residual epilogues, RoPE + KV write + attention in C++) against model.Block's torch
ops, on the scheduler's slot cache: Llama, Mistral with a sliding window shorter than the
prompts, Qwen2 (qkv biases) with a head size that is not a multiple of the AVX2 width; no
experts, explicit dense gates, token routing; rows at a slot offset, different lengths."""
import pytest
import torch

from pf_engine import Engine
from pf_engine.backends.base import Blocks
from pf_engine.backends.cpu.decode import CpuRunner
from pf_engine.persona.bank import AdapterBank
from pf_engine.model.config import ModelConfig
from pf_engine.model.kv_cache import SlotCache
from pf_engine.backends import backend_status
from pf_engine.model.decoder import SCRATCH
from pf_engine.persona.mix import Mix
from pf_engine.model.step import WHOLE, Step

DECODE = Step(decode=True)

ok, why = backend_status("cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")

ARCHS = {"llama": {}, "mistral": {"sliding_window": 5},
         "qwen2": {"hidden_size": 40, "intermediate_size": 75, "num_attention_heads": 4,
                   "num_key_value_heads": 2}}


@pytest.fixture(scope="module", params=list(ARCHS))
def engine(request, hf_model_dir):
    folder, _ = hf_model_dir(request.param, f"cpudec_{request.param}", **ARCHS[request.param])
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=[4, 8, 2, 8, 4, 2, 8, 4, 2, 8], seed=5, router=True)
    for _, (a, b) in bank._weights.items():            # large enough for the experts to matter
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())) * 0.5)
    return Engine.from_pretrained(folder, adapters=bank, backend="cpu", progress=False,
                                  device="cpu", dtype="fp32")


def prefilled(eng, lengths, s0):
    """A slot pool whose rows s0.. hold random prompts of ``lengths`` (prefilled by the torch
    blocks: T > 1) and the decode step's inputs."""
    m, c = eng.model, eng.config
    pool = SlotCache(c.num_hidden_layers, s0 + len(lengths), c.num_key_value_heads, 24, c.head_dim,
                     torch.float32, "cpu")
    g = torch.Generator().manual_seed(sum(lengths))
    T = max(lengths)
    view = pool.rows_view(s0, [0] * len(lengths), lengths)
    tokens = torch.randint(3, 256, (len(lengths), T), generator=g)
    m(tokens, view.positions, view, view.mask(c.sliding_window))
    view = pool.rows_view(s0, lengths, [1] * len(lengths))
    return pool, view, torch.randint(3, 256, (len(lengths), 1), generator=g)


def mix_for(eng, kind, B):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(B)
    gates = torch.rand(B, eng.bank.num_experts, generator=g)
    gates[0] = 0                                           # a base-model row among mixed ones
    if kind == "token":
        return Mix(gates, eng.bank.token_router, torch.tensor([i % 2 == 1 for i in range(B)]))
    return Mix(gates)


def use_runner(eng, fast: bool):
    """The C++ decode step (the cpu backend's runner) or model.decoder.Block's torch ops."""
    eng.model.runner = CpuRunner(eng.model) if fast else Blocks(eng.model)


@pytest.mark.parametrize("kind", [None, "dense", "token"])
@pytest.mark.parametrize("lengths, s0", [([3], 0), ([7, 2, 5, 9], 1)])
def test_decode_step_matches_the_torch_blocks(engine, kind, lengths, s0):
    """Logits and the keys/values written equal model.Block's (fp32, 1e-4)."""
    eng, out = engine, {}
    for fast in (True, False):
        use_runner(eng, fast)
        pool, view, tok = prefilled(eng, lengths, s0)
        mix = mix_for(eng, kind, len(lengths))
        x = eng.model.embed[tok]
        runner = eng.model.runner                                        # the path under test ran
        assert (isinstance(runner, CpuRunner) and runner.applies(x, view, DECODE)) == fast
        logits = eng.model(tok, view.positions, view, view.mask(eng.config.sliding_window), mix=mix,
                           step=DECODE)
        out[fast] = (logits, pool.k.clone(), pool.v.clone(), None if mix is None else mix.token_sum)
    for a, b in zip(out[True], out[False]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_eligibility(engine, hf_model_dir):
    """Only CPU fp32 decode steps of at most MAX_ROWS rows on a slot cache take the C++ path, and
    only on the cpu backend (the backend chosen for the engine decides its runner)."""
    eng = engine
    use_runner(eng, True)
    pool, view, tok = prefilled(eng, [3, 4], 0)
    x = eng.model.embed[tok]
    runner = eng.model.runner
    assert runner.applies(x, view, DECODE)
    assert not runner.applies(x.double(), view, DECODE)
    assert not runner.applies(torch.cat([x, x], 1), view, WHOLE)   # not a decode step
    assert not runner.applies(x[:1].expand(17, 1, x.shape[-1]), view, DECODE)
    assert not runner.applies(x, SCRATCH, DECODE)
    other = Engine.from_pretrained(eng.folder, adapters=eng.bank, backend="torch", progress=False,
                                   device="cpu", dtype="fp32")
    assert type(other.model.runner) is Blocks


def test_generation_is_unchanged(engine):
    """Greedy generation through the scheduler, every persona kind in one batch, gives the same
    tokens with the C++ decode step and without it."""
    eng = engine
    personas = [None, {eng.bank.expert_names[1]: 0.8, eng.bank.expert_names[4]: 0.5}, "auto", "token"]
    prompts = [[5 + i, 17, 33 + 2 * i, 9][: 2 + i] for i in range(4)]
    out = {}
    for fast in (True, False):
        use_runner(eng, fast)
        out[fast] = [o.token_ids for o in eng.generate(prompts, max_new_tokens=6, persona=personas)]
    assert out[True] == out[False]
