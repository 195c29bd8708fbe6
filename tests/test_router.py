"""Gates: explicit persona weights, the persona parser, the sequence and token routers."""
import math

import pytest
import torch
import torch.nn.functional as F

from pf_engine.persona.bank import AdapterBank
from pf_engine.model.config import PRESETS, ModelConfig
from pf_engine.errors import LoadError, PFError, RequestError
from pf_engine.persona.router import (SequenceRouter, TokenRouter, explicit_gates, parse_persona,
                              top_k_renormalise)

NAMES = ["openness+", "openness-", "extraversion+", "agreeableness+"]
TINY = ModelConfig(**PRESETS["tiny"])


# Explicit weights --------------------------------------------------------------------------------
def test_explicit_gates_used_as_given():
    g = explicit_gates({"extraversion+": 0.8, "agreeableness+": 0.4}, NAMES)
    assert g.dtype == torch.float32 and g.tolist() == pytest.approx([0, 0, 0.8, 0.4])
    assert explicit_gates({"openness-": 1.0}, NAMES).tolist() == [0, 1, 0, 0]   # not normalised
    assert explicit_gates({"openness-": 3}, NAMES).tolist() == [0, 3, 0, 0]
    assert explicit_gates({"openness+": 0.5, "openness-": 0.5}, NAMES).tolist() == [0.5, 0.5, 0, 0]
    assert explicit_gates({"openness+": 0.0, "openness-": 2.0}, NAMES).tolist() == [0, 2, 0, 0]


@pytest.mark.parametrize("persona,pattern", [
    ({"calm": 1.0}, "unknown expert 'calm'; this bank's experts are: openness\\+, openness-, "
                    "extraversion\\+, agreeableness\\+"),
    ({"openness+": float("nan")}, "'openness\\+' must be finite and >= 0, got nan"),
    ({"openness+": float("inf")}, "must be finite and >= 0, got inf"),
    ({"openness+": -0.5}, "must be finite and >= 0, got -0.5"),
    ({"openness+": 0.0, "openness-": 0}, "all zero"),
    ({}, "persona is empty"),
    ({"openness+": "high"}, "must be a number, got 'high'"),
    ({"openness+": True}, "must be a number"),
])
def test_explicit_gates_errors(persona, pattern):
    with pytest.raises(RequestError, match=pattern) as e:
        explicit_gates(persona, NAMES)
    assert "\n" not in str(e.value)


def test_parse_persona():
    assert parse_persona("auto") == "auto" and parse_persona("  AUTO ") == "auto"
    assert parse_persona("extraversion+=0.8,agreeableness+=0.4") == {
        "extraversion+": 0.8, "agreeableness+": 0.4}
    assert parse_persona(" openness- = 1 , neuroticism+=2e-1") == {
        "openness-": 1.0, "neuroticism+": 0.2}
    assert parse_persona('{"openness+": 0.5}') == {"openness+": 0.5}


@pytest.mark.parametrize("s", ["", "extraversion+", "extraversion+=", "=0.5", "a=b",
                               "a=0.5,,b=1", "a=1,a=2", "{not json", "[1, 2]", '{"a": "x"}'])
def test_parse_persona_errors(s):
    with pytest.raises(RequestError) as e:
        parse_persona(s)
    assert "\n" not in str(e.value) and "persona" in str(e.value)


# top-k ------------------------------------------------------------------------------------------
def test_top_k_zeroes_the_rest_and_breaks_ties_by_index():
    p = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.2, 0.0]])
    g = top_k_renormalise(p, 2)
    assert g.tolist()[0] == [0, 0.5, 0.5, 0]                     # ties: lower index wins
    assert g.tolist()[1] == [0.5, 0.5, 0, 0]
    assert g[2].tolist() == pytest.approx([0.7 / 0.9, 0, 0.2 / 0.9, 0])
    assert (torch.count_nonzero(g, dim=-1) == 2).all()
    assert torch.allclose(g.sum(-1), torch.ones(3))
    assert torch.allclose(top_k_renormalise(p, None), p / p.sum(-1, keepdim=True))


def test_a_none_output_at_one_gives_zero_gates_not_nan():
    """With a "none" output the experts' probabilities can all underflow to 0 (a prompt far on
    the none side, seen with the retrained bigfive on "Question: ..." prompts): the gates are
    then 0 (the base model), not 0/0 = NaN, which broke pf-serve's JSON and the mix."""
    assert top_k_renormalise(torch.zeros(2, 4), 2).tolist() == [[0.0] * 4] * 2
    r = SequenceRouter(torch.zeros(4, 3), torch.zeros(4), torch.zeros(3, 4),
                       torch.tensor([-200.0, -200.0, 200.0]), top_k=1, none=True)
    p = r.probabilities(torch.zeros(1, 3))
    assert p[0, :2].tolist() == [0.0, 0.0]                      # float32 underflow
    assert r.gates(p).tolist() == [[0.0, 0.0]]


# Sequence router ---------------------------------------------------------------------------------
def _probs(r, hidden, mask):
    """fp64 softmax over the router's outputs for masked mean-pooled hidden states."""
    h = hidden.double()
    m = mask.double().unsqueeze(-1)
    pooled = (h * m).sum(1) / m.sum(1)
    z = F.silu(pooled @ r.w1.double().T + r.b1.double())
    return torch.softmax((z @ r.w2.double().T + r.b2.double()) / r.temperature, -1)


def _seq_reference(r, hidden, mask):
    p = _probs(r, hidden, mask)
    if r.top_k:
        thresh = p.topk(r.top_k, -1).values[:, -1:]
        p = torch.where(p >= thresh, p, 0)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_sequence_router_matches_reference(top_k):
    K, d = 10, 64
    r = SequenceRouter.random(K, d, router_hidden=32, layer=1, temperature=0.3, top_k=top_k,
                              seed=5)
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, d)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False                                          # left padding
    g = r(hidden, mask)
    assert g.shape == (3, K) and g.dtype == torch.float32
    assert torch.allclose(g.double(), _seq_reference(r, hidden, mask), atol=1e-6)
    assert torch.allclose(g.sum(-1), torch.ones(3))
    if top_k:
        assert (torch.count_nonzero(g, dim=-1) == top_k).all()
    # deterministic, and padded positions are ignored
    assert torch.equal(r(hidden, mask), g)
    junk = hidden.clone()
    junk[1, 4:] = 1e3
    junk[2, :2] = -1e3
    assert torch.equal(r(junk, mask), g)
    # bf16 hidden states are read in fp32
    assert r(hidden.bfloat16(), mask).dtype == torch.float32
    assert torch.equal(r(hidden, None), r(hidden, torch.ones(3, 7, dtype=torch.bool)))


def _none_reference(r, hidden, mask):
    """fp64: softmax over K+1 outputs, top-k of the K experts renormalised, times 1 - p_none."""
    p = _probs(r, hidden, mask)
    experts, none = p[:, :-1], p[:, -1:]
    thresh = experts.topk(r.top_k, -1).values[:, -1:]
    g = torch.where(experts >= thresh, experts, 0)
    return g / g.sum(-1, keepdim=True) * (1 - none), 1 - none[:, 0]


def test_sequence_router_with_a_none_output_scales_the_mix_by_its_strength(tmp_path):
    K, d = len(NAMES), 64
    r = SequenceRouter.random(K, d, router_hidden=16, layer=1, temperature=0.7, top_k=2, seed=6,
                              none=True)
    assert r.none and r.num_experts == K and tuple(r.w2.shape) == (K + 1, 16)
    torch.manual_seed(2)
    hidden, mask = torch.randn(4, 6, d), torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    g = r(hidden, mask)
    ref, strength = _none_reference(r, hidden, mask)
    assert g.shape == (4, K) and torch.allclose(g.double(), ref, atol=1e-6)
    assert torch.allclose(g.sum(-1).double(), strength, atol=1e-6)
    assert (g.sum(-1) < 1 - 1e-4).all()                       # the none share is taken off
    # a router sure that no persona is called for gives (almost) nothing to any expert
    sure = SequenceRouter(r.w1, r.b1, r.w2, r.b2 + torch.tensor([0.0] * K + [30.0]), layer=1,
                          top_k=2, none=True)
    assert float(sure(hidden, mask).sum(-1).max()) < 1e-9
    # round trip through the bank file, and a bank file without "none" still loads as before
    bank = AdapterBank.random(TINY, NAMES, rank=2, router="sequence", seed=3)
    plain = bank.router
    bank.router = r
    path = tmp_path / "none.safetensors"
    bank.save(path)
    back = AdapterBank.load(path, TINY)
    assert back.router.config()["none"] is True
    assert torch.equal(back.router(hidden, mask), g)
    bank.router = plain
    bank.save(path, overwrite=True)
    assert AdapterBank.load(path, TINY).router.none is False
    with pytest.raises(PFError, match="shapes do not agree"):
        SequenceRouter(r.w1, r.b1, r.w2[:K], r.b2, none=True)      # none needs K + 1 outputs


def test_calibrated_strength_matches_reference_and_round_trips(tmp_path):
    """strength = S * sigmoid(a * (logit(1 - p_none) - c)) in fp64, through the bank file."""
    K, d = len(NAMES), 64
    cal = {"scale": 0.75, "slope": 0.6, "centre": -1.3}
    r = SequenceRouter.random(K, d, router_hidden=16, layer=1, top_k=2, seed=8, none=True,
                              strength=cal)
    torch.manual_seed(3)
    hidden, mask = torch.randn(5, 6, d), torch.ones(5, 6, dtype=torch.bool)
    ref, q = _none_reference(r, hidden, mask)
    want = 0.75 * torch.sigmoid(0.6 * (torch.log(q) - torch.log1p(-q) + 1.3))
    g = r(hidden, mask)
    assert torch.allclose(g.sum(-1).double(), want, atol=1e-6)
    assert torch.allclose(g.double(), ref / q[:, None] * want[:, None], atol=1e-6)
    assert not torch.allclose(g.sum(-1).double(), q, atol=1e-3)       # not the plain strength
    bank = AdapterBank.random(TINY, NAMES, rank=2, router="sequence", seed=3)
    bank.router = r
    path = tmp_path / "cal.safetensors"
    bank.save(path)
    back = AdapterBank.load(path, TINY)
    assert back.router.config()["strength"] == cal
    assert torch.equal(back.router(hidden, mask), g)


@pytest.mark.parametrize("strength,none,pattern", [
    ({"scale": 0.7, "slope": 1.0, "centre": 0.0}, False, "needs a none output"),
    ({"scale": 0.7, "slope": 1.0}, True, "keys"),
    ({"scale": 1.5, "slope": 1.0, "centre": 0.0}, True, "0 < scale <= 1"),
    ({"scale": 0.7, "slope": -1.0, "centre": 0.0}, True, "slope > 0"),
    ({"scale": 0.7, "slope": 1.0, "centre": float("nan")}, True, "finite centre"),
    ({"scale": "x", "slope": 1.0, "centre": 0.0}, True, "must be numbers"),
])
def test_calibrated_strength_errors(strength, none, pattern):
    w1, b1 = torch.zeros(8, 4), torch.zeros(8)
    w2, b2 = torch.zeros(3 + none, 8), torch.zeros(3 + none)
    with pytest.raises(PFError, match=pattern):
        SequenceRouter(w1, b1, w2, b2, none=none, strength=strength)


def test_sequence_router_validates_config():
    w1, b1, w2, b2 = torch.zeros(8, 4), torch.zeros(8), torch.zeros(3, 8), torch.zeros(3)
    with pytest.raises(PFError, match="top_k must be an integer in 1..3"):
        SequenceRouter(w1, b1, w2, b2, top_k=4)
    with pytest.raises(PFError, match="temperature must be finite and > 0"):
        SequenceRouter(w1, b1, w2, b2, temperature=0.0)
    with pytest.raises(PFError, match="shapes do not agree"):
        SequenceRouter(w1, b1, torch.zeros(3, 7), b2)
    r = SequenceRouter(w1, b1, w2, b2, top_k=0)
    assert r.top_k is None
    assert torch.allclose(r(torch.randn(2, 5, 4)), torch.full((2, 3), 1 / 3))   # uniform


# Token router ------------------------------------------------------------------------------------
def test_token_router_matches_reference_and_top_k():
    K, d, L = 6, 64, 3
    r = TokenRouter.random(K, d, L, top_k=2, seed=9)
    torch.manual_seed(1)
    h = torch.randn(11, d)
    for layer in range(L):
        g = r(layer, h)
        assert g.shape == (11, K) and g.dtype == torch.float32
        p = torch.softmax(h.double() @ r.w[layer].double().T + r.b[layer].double(), -1)
        top = p.topk(2, -1)
        ref = torch.zeros_like(p).scatter(-1, top.indices, top.values)
        ref = ref / ref.sum(-1, keepdim=True)
        assert torch.allclose(g.double(), ref, atol=1e-6)
        assert (torch.count_nonzero(g, dim=-1) == 2).all()
        assert torch.equal(r(layer, h), g)
    assert not torch.equal(r(0, h), r(1, h))
    assert torch.allclose(TokenRouter.random(K, d, L, top_k=None)(0, h).sum(-1), torch.ones(11))
    with pytest.raises(PFError, match="one weight and one bias per layer"):
        TokenRouter([torch.zeros(K, d)], [])


# Round trip through the bank file ----------------------------------------------------------------
def test_routers_round_trip_through_bank_file(tmp_path):
    bank = AdapterBank.random(TINY, NAMES, rank=4, router=True, seed=2)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    back = AdapterBank.load(path, TINY)
    assert back.router.config() == bank.router.config()
    assert back.token_router.config() == bank.token_router.config()
    for name, t in bank.router.tensors().items():
        assert torch.equal(back.router.tensors()[name], t), name
    for name, t in bank.token_router.tensors().items():
        assert torch.equal(back.token_router.tensors()[name], t), name
    assert set(bank.router.tensors()) == {"router.seq.w1", "router.seq.b1", "router.seq.w2",
                                          "router.seq.b2"}
    assert "router.tok.1.w" in bank.token_router.tensors()
    torch.manual_seed(3)
    hidden, mask = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(back.router(hidden, mask), bank.router(hidden, mask))
    assert torch.equal(back.token_router(1, hidden[0]), bank.token_router(1, hidden[0]))
    # a non-default router config survives too
    bank.router = SequenceRouter.random(len(NAMES), 64, router_hidden=16, layer=2,
                                        temperature=0.25, top_k=None, seed=4)
    bank.token_router = None
    bank.save(path, overwrite=True)
    back = AdapterBank.load(path, TINY)
    assert back.router.config() == {"layer": 2, "temperature": 0.25, "top_k": None, "hidden": 16,
                                    "none": False}
    assert back.token_router is None
    assert torch.equal(back.router(hidden, mask), bank.router(hidden, mask))


def test_router_only_one_kind_and_bad_router_tensors(tmp_path):
    seq_only = AdapterBank.random(TINY, NAMES, rank=2, router="sequence")
    assert seq_only.router is not None and seq_only.token_router is None
    with pytest.raises(PFError, match="no token router"):
        seq_only.require_router("token")
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = tmp_path / "bank.safetensors"
    seq_only.save(path)
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["router.seq.w2"] = torch.zeros(3, 64)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(LoadError, match=r"router tensor router\.seq\.w2 has shape \[3, 64\], "
                                        r"expected \[4, 64\]"):
        AdapterBank.load(bad, TINY)
    meta_far = dict(meta, router=meta["router"].replace('"layer": 0', '"layer": 9'))
    save_file(load_file_dict(path), bad, metadata=meta_far)
    with pytest.raises(LoadError, match="sequence router reads layer 9"):
        AdapterBank.load(bad, TINY)


def load_file_dict(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_random_router_is_seeded():
    a = SequenceRouter.random(10, 64, seed=1)
    b = SequenceRouter.random(10, 64, seed=1)
    c = SequenceRouter.random(10, 64, seed=2)
    assert torch.equal(a.w1, b.w1) and not torch.equal(a.w1, c.w1)
    assert math.isclose(a.temperature, 1.0) and a.top_k == 2 and a.layer == 0


# The same gates on every CPU ----------------------------------------------------------------------
def _permuted_seq(r: SequenceRouter, pd: torch.Tensor, ph: torch.Tensor) -> SequenceRouter:
    """r with its input features and hidden units reordered: the same function, other sums."""
    return SequenceRouter(r.w1[ph][:, pd], r.b1[ph], r.w2[:, ph], r.b2, layer=r.layer,
                          top_k=r.top_k, none=r.none, strength=r.strength)


@pytest.mark.parametrize("none", [False, True])
def test_sequence_gates_do_not_depend_on_the_order_of_the_sums(none):
    """A float32 GEMM's blocking (and a reduction's lane order) differs between CPUs and BLAS
    builds, so float32 gates differ in their last bits from one machine to another; on the 4-bit
    default such bits reach the replies (the 8-bit activation rounding).  Reordering the sums
    stands in for another machine: the gates must come out the same bits."""
    g = torch.Generator().manual_seed(7)
    d, H, K = 96, 48, 10
    r = SequenceRouter.random(K, d, router_hidden=H, generator=g, none=none, top_k=2,
                              strength={"scale": 0.75, "slope": 1.3, "centre": 0.2} if none
                              else None)
    r.b1 = 0.1 * torch.randn(H, generator=g)
    hidden = torch.randn(64, 9, d, generator=g)
    pd, ph, pt = (torch.randperm(n, generator=g) for n in (d, H, 9))
    got = r(hidden)
    assert got.dtype == torch.float32
    assert torch.equal(got, _permuted_seq(r, pd, ph)(hidden[:, pt][..., pd]))


def test_token_gates_do_not_depend_on_the_order_of_the_sums():
    g = torch.Generator().manual_seed(8)
    d, K = 96, 10
    r = TokenRouter.random(K, d, num_layers=2, generator=g)
    pd = torch.randperm(d, generator=g)
    h = torch.randn(256, d, generator=g)
    other = TokenRouter([w[:, pd] for w in r.w], r.b, top_k=r.top_k)
    got = r(1, h)
    assert got.dtype == torch.float32 and torch.equal(got, other(1, h[:, pd]))
