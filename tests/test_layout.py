"""pf_kernels.RankLayout: the one rank-layout type of adapters, mixing, kernels and references."""
import pytest
import torch

from pf_kernels import LoRAMeta, RankLayout, bank_layout
from pf_kernels.reference import grouped_lora_loop_ref, grouped_lora_ref


def test_worked_example():
    """The module doc's example: experts 0 and 2, ranks 2 and 3, scalings 2 and 1."""
    lay = RankLayout.interned([0, 2], [2, 3], [2.0, 1.0], "cpu")
    assert lay.experts == (0, 2) and lay.offsets == (0, 2, 5) and lay.ranks == (2, 3)
    assert (lay.num_experts, lay.total_rank, lay.max_rank) == (2, 5, 3)
    assert lay.col_expert.tolist() == [0, 0, 2, 2, 2]
    assert lay.col_scaling.tolist() == [2, 2, 1, 1, 1]
    assert lay.rank_offsets.dtype == torch.int32 and lay.rank_offsets.tolist() == [0, 2, 5]
    assert lay.scalings.dtype == torch.float32 and lay.expert_ids.tolist() == [0, 2]
    assert lay.blocks == [(0, 0, 2, 2.0), (2, 2, 5, 1.0)]


def test_interned_by_value():
    """Equal values on one device are one object (per-forward caches key on it); the scalings
    are compared as the fp32 values the kernels read."""
    a = RankLayout.interned([1, 3], [4, 8], [0.1, 0.25], "cpu")
    assert RankLayout.interned((1, 3), (4, 8), (0.1, 0.25), torch.device("cpu")) is a
    assert RankLayout.interned([1, 3], [4, 8], [0.1, 0.5], "cpu") is not a
    assert RankLayout.interned([1, 2], [4, 8], [0.1, 0.25], "cpu") is not a
    assert a.host_scalings == tuple(torch.tensor([0.1, 0.25]).tolist())
    assert a.to("cpu") is a


def test_concat_and_select():
    q = RankLayout.interned([0, 2], [2, 3], [2.0, 1.0], "cpu")
    v = RankLayout.interned([1, 2], [4, 1], [0.5, 1.0], "cpu")
    qv = RankLayout.concat([q, v])
    assert qv.experts == (0, 2, 1, 2) and qv.offsets == (0, 2, 5, 9, 10)
    assert qv.col_expert.tolist() == q.col_expert.tolist() + v.col_expert.tolist()
    sub, rows = qv.select({2})
    assert sub.experts == (2, 2) and sub.ranks == (3, 1) and rows == [2, 3, 4, 9]
    assert qv.select({7}) == (None, [])


def test_kernel_api_and_references_take_a_layout():
    """bank_layout, LoRAMeta and the references accept a RankLayout in place of
    (rank_offsets, scalings), with the same results."""
    g = torch.Generator().manual_seed(0)
    lay = RankLayout([0, 3, 4, 9], torch.rand(3, generator=g) + 0.5)
    x, a, b = (torch.randn(s, generator=g) for s in ((5, 8), (9, 8), (6, 9)))
    gates = torch.rand(5, 3, generator=g) * (torch.rand(5, 3, generator=g) > 0.4)
    want = grouped_lora_ref(x, a, b, gates, [0, 3, 4, 9], lay.scalings)
    assert torch.equal(grouped_lora_ref(x, a, b, gates, lay, None), want)
    assert torch.allclose(grouped_lora_loop_ref(x, a, b, gates, lay, None), want)
    assert bank_layout(lay, None, "cpu") is lay
    meta = LoRAMeta.build(gates, lay, None)
    assert meta.layout is lay and meta.expert_of_rank.tolist() == [0] * 3 + [1] + [2] * 5
    with pytest.raises(ValueError, match="scalings must be None when rank_offsets is a RankLayout"):
        bank_layout(lay, torch.ones(3), "cpu")


@pytest.mark.parametrize("args, match", [
    (([0, 2, 1], torch.ones(2)), "must start at 0 and never decrease"),
    (([0, 2, 5], torch.ones(3)), "scalings has 3 entries but rank_offsets implies K=2"),
    (([0, 2, 5], torch.ones(2, dtype=torch.float64)), "scalings must be float32"),
])
def test_bad_layouts_name_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        RankLayout(*args)
    with pytest.raises(ValueError, match="experts has 1 ids but rank_offsets implies n=2"):
        RankLayout([0, 2, 5], torch.ones(2), experts=[4])
