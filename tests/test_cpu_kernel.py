"""csrc/cpu's fused grouped-LoRA linear (the ``cpu`` backend) against the fp64 reference of
pf_kernels: odd sizes that are not multiples of the AVX2 width (8), mixed ranks, K = 1..16, every
projection group, biases, zero / top-k / token / dense gates, T = 1..16.  Skips when the module is
not built or the CPU lacks AVX2/FMA."""
import pytest
import torch

from pf_engine.persona.bank import AdapterBank
from pf_engine.model.config import ModelConfig
from pf_engine.backends import backend_status, create
from pf_engine.model.linear import Linear
from pf_engine.persona.mix import Mix
from pf_kernels.reference import grouped_lora_ref

ok, why = backend_status("cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(not ok, reason=f"cpu backend unavailable: {why}")
CPU = create("cpu", "cpu")

CFG = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=64,
                                 hidden_size=44, intermediate_size=75, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2))
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def bank(K: int, seed: int) -> AdapterBank:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 17, (K,), generator=g).tolist()
    names = [f"x{i}" for i in range(K)]
    mods = ["q", "k", "v", "o", "gate", "up", "down"]
    modules = {n: [m for m in mods if torch.rand(1, generator=g) < 0.7] or ["q"] for n in names}
    b = AdapterBank.random(CFG, names, rank=ranks, modules=modules, seed=seed)
    for _, (a, bb) in b._weights.items():
        bb.copy_(torch.randn(bb.shape, generator=g) * 0.3)
    return b


def gates(kind: str, T: int, K: int, g) -> torch.Tensor:
    if kind == "dense":
        return torch.rand(T, K, generator=g)
    out = torch.zeros(T, K)
    if kind == "zero":
        return out
    for t in range(T):
        k = 2 if kind == "top2-token" else 1
        idx = torch.randperm(K, generator=g)[:k] if kind == "top2-token" else torch.tensor([t % K])
        out[t, idx] = torch.rand(len(idx), generator=g) + 0.1
    if kind == "mixed-rows":
        out = torch.rand(T, K, generator=g)
        out[::2] = 0
    return out


@pytest.mark.parametrize("K", [1, 3, 10, 16])
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_cpu_kernel_matches_fp64(K, group, T):
    g = torch.Generator().manual_seed(hash((K, group, T)) % 2 ** 31)
    b = bank(K, seed=K)
    mods = GROUPS[group]
    shapes = [CFG.module_shape(m) for m in mods]
    d_in = shapes[0][1]
    w = torch.randn(sum(s[0] for s in shapes), d_in, generator=g) / d_in ** 0.5
    for bias in (None, torch.randn(w.shape[0], generator=g)):
        lin = Linear(w.clone(), None if bias is None else bias.clone(),
                     tuple(s[0] for s in shapes) if len(mods) > 1 else None, mods, CPU)
        lin.attach({m: b.lora(0, m) for m in mods}, b.num_experts)
        x = torch.randn(T, 1, d_in, generator=g)
        for kind in ("dense", "top2-token", "one-per-token", "zero", "mixed-rows"):
            gt = gates(kind, T, K, g)
            out = lin(x, Mix(gt))
            got = torch.cat(out, -1) if isinstance(out, tuple) else out
            want = x[:, 0].double() @ w.double().t() + (0 if bias is None else bias.double())
            o = 0
            for m, (d_out, _) in zip(mods, shapes):
                lw = b.lora(0, m)
                if lw is not None:
                    ids = lw.expert_ids
                    want[:, o:o + d_out] += grouped_lora_ref(x[:, 0], lw.a, lw.b, gt[:, ids],
                                                             lw.rank_offsets, torch.tensor(b.scalings)[ids])
                o += d_out
            err = (got[:, 0].double() - want).abs().max().item()
            assert err <= 1e-5 * (1 + want.abs().max().item()), (kind, bias is None, err)


def test_cpu_backend_hands_large_batches_to_torch():
    """Prefill-sized batches (more rows than the kernel's MAX_ROWS) take the torch GEMMs: same result."""
    b = bank(4, seed=7)
    w = torch.randn(75, 44)
    lins = [Linear(w, None, None, ("up",), create(name, "cpu")) for name in ("cpu", "torch")]
    for lin in lins:
        lin.attach({"up": b.lora(0, "up")}, b.num_experts)
    x = torch.randn(40, 44)
    gt = torch.rand(40, 4)
    assert torch.allclose(lins[0](x, Mix(gt)), lins[1](x, Mix(gt)), atol=1e-5)
