"""mixing.Linear, every backend, against the fp64 reference of pf_kernels (not against each other).

Fused groups (q|k|v, gate|up) and single projections, biases, mixed ranks, experts that target
only some projections, zero gates, top-k gates, decode (T=1) and prefill shapes, and the token
router against an independent per-layer reference.
"""
import os

import pytest
import torch

from pf_engine.persona.bank import AdapterBank
from pf_engine.model.config import ModelConfig
from pf_engine.backends import backend_status, create
from pf_engine.model.linear import Linear
from pf_engine.persona.mix import Mix
from pf_kernels.reference import grouped_lora_ref

CFG = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=64,
                                 hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2))
NAMES = ["a", "b", "c", "d", "e"]
MODULES = {"a": ["q", "v", "gate", "o"], "b": ["q", "k", "v", "up", "down"], "c": ["k", "gate"],
           "d": ["q", "k", "v", "o", "gate", "up", "down"], "e": ["v", "up"]}
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def backends():
    out = ["torch", "naive"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    if backend_status("cpu", torch.device("cpu"))[0]:
        out.append("cpu")
    return out


def make_bank() -> AdapterBank:
    """Five experts with mixed ranks and target sets, B scaled up so their delta matters at 1e-5."""
    b = AdapterBank.random(CFG, NAMES, rank=[2, 5, 3, 4, 1], modules=MODULES, seed=3)
    g = torch.Generator().manual_seed(4)
    for key, (a, bb) in b._weights.items():      # larger B: the delta must matter at 1e-5
        bb.copy_(torch.randn(bb.shape, generator=g) * 0.3)
    return b


@pytest.fixture(scope="module")
def bank():
    return make_bank()


def make_linear(bank, group: str, bias: bool, seed: int, backend: str = "torch"):
    """(Linear on the bank's device and dtype, its weight and bias as CPU fp32 tensors, shapes)."""
    g = torch.Generator().manual_seed(seed)
    mods = GROUPS[group]
    shapes = [CFG.module_shape(m) for m in mods]
    d_in = shapes[0][1]
    dev, dt = bank.device, bank.dtype
    w = (torch.randn(sum(s[0] for s in shapes), d_in, generator=g) / d_in ** 0.5).to(dt).float()
    b = torch.randn(w.shape[0], generator=g).to(dt).float() if bias else None
    lin = Linear(w.to(dev, dt), None if b is None else b.to(dev, dt),
                 tuple(s[0] for s in shapes) if len(mods) > 1 else None, mods, create(backend, dev))
    lin.attach({m: bank.lora(0, m) for m in mods}, bank.num_experts)
    return lin, w, b, shapes


def reference(bank, group, w, b, shapes, x, gates):
    """fp64: x W^T + b, plus grouped_lora_ref per projection over its own experts."""
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    o = 0
    for m, (d_out, _) in zip(GROUPS[group], shapes):
        lw = bank.lora(0, m)
        if lw is not None:
            ids = lw.expert_ids.cpu()
            y[:, o:o + d_out] += grouped_lora_ref(
                x.cpu(), lw.a.cpu(), lw.b.cpu(), gates.cpu()[:, ids], lw.rank_offsets.cpu(),
                torch.tensor(bank.scalings)[ids])
        o += d_out
    return y


def gate_patterns(T, K, g):
    dense = torch.rand(T, K, generator=g)
    top2 = torch.zeros(T, K)
    for t in range(T):
        top2[t, torch.randperm(K, generator=g)[:2]] = torch.rand(2, generator=g) + 0.1
    zero = torch.zeros(T, K)
    some = dense.clone()
    some[::2] = 0                      # base-model rows beside persona rows
    one = torch.zeros(T, K)
    one[:, 2] = 1.3                    # an expert that targets only k and gate
    return {"dense": dense, "top2-token": top2, "zero": zero, "mixed-rows": some, "only-c": one}


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 7])
def test_linear_matches_fp64_reference(bank, backend, group, bias, T):
    g = torch.Generator().manual_seed(hash((group, bias, T)) % 2**31)
    lin, w, b, shapes = make_linear(bank, group, bias, seed=T, backend=backend)
    x = torch.randn(1, T, shapes[0][1], generator=g)
    for name, gates in gate_patterns(T, len(NAMES), g).items():
        want = reference(bank, group, w, b, shapes, x[0], gates)
        out = lin(x, Mix(gates))
        got = torch.cat(out, -1) if isinstance(out, tuple) else out
        assert got.shape == (1, T, want.shape[1])
        if isinstance(out, tuple):          # fused groups come back as per-projection slices
            assert [o.shape[-1] for o in out] == [s[0] for s in shapes]
        err = (got[0].double() - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()), (name, err)


def test_reference_is_not_blind(bank):
    """The check above fails when a projection's delta is dropped."""
    lin, w, b, shapes = make_linear(bank, "qkv", True, seed=1)
    x = torch.randn(3, shapes[0][1])
    gates = torch.rand(3, len(NAMES))
    want = reference(bank, "qkv", w, b, shapes, x, gates)
    base = x.double() @ w.double().t() + b.double()
    assert (want - base).abs().max() > 1e-2


def test_token_router_against_independent_reference(bank):
    """Token-routed rows get softmax -> top-k -> renormalised gates from the layer input, the
    other rows keep their fixed gates; computed here from the router's raw weights."""
    from pf_engine.persona.router import TokenRouter
    d, K = CFG.hidden_size, len(NAMES)
    router = TokenRouter.random(K, d, CFG.num_hidden_layers, top_k=2, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, d, generator=g)                       # (B, T, d) entering layer 1
    fixed = torch.rand(6, K, generator=g)
    rows = torch.tensor([True, True, True, False, False, False])
    mix = Mix(fixed.clone(), router, rows).enter_layer(1, x)
    logits = x.reshape(6, d).double() @ router.w[1].double().t() + router.b[1].double()
    p = torch.softmax(logits, -1)
    want = torch.zeros_like(p)
    for i in range(6):
        top = sorted(range(K), key=lambda k: (-p[i, k].item(), k))[:2]
        want[i, top] = p[i, top] / p[i, top].sum()
    want[3:] = fixed[3:].double()
    assert (mix.gates.double() - want).abs().max() <= 1e-6
    assert mix.active == tuple(k for k in range(K) if want[:, k].abs().sum() > 0)


def test_gathered_sets_are_kept_while_batches_alternate(bank):
    """A continuous batch alternates active sets (the decode batch's, each admitted prompt's): the
    Linear keeps the gathered copies of recent sets instead of rebuilding them every call, and the
    outputs with a host-given active set equal those it finds itself."""
    from pf_engine.backends import grouped
    lin, w, b, shapes = make_linear(bank, "qkv", True, seed=9)
    x = torch.randn(1, 2, shapes[0][1])
    g1, g2 = torch.zeros(2, len(NAMES)), torch.zeros(2, len(NAMES))
    g1[:, [0, 3]], g2[:, 1] = 0.5, 0.8
    lin(x, Mix(g1))
    first = lin.state.sets[(0, 3)]
    for _ in range(3):
        out2 = lin(x, Mix(g2, active=(1,)))
        lin(x, Mix(g1))
    assert lin.state.sets[(0, 3)] is first
    want = reference(bank, "qkv", w, b, shapes, x[0], g2)
    assert (torch.cat(out2, -1)[0].double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    for e in range(len(NAMES)):                             # more sets than are kept
        g = torch.zeros(2, len(NAMES))
        g[:, e] = 1.0
        lin(x, Mix(g))
    assert len(lin.state.sets) == grouped.GATHERED_SETS < len(NAMES) and (0, 3) not in lin.state.sets
