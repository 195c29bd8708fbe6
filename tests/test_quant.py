"""Weights stored as bytes (block-quantized q8_0, q4_0, q4_1, q5_0, K-quants q4_k, q5_k, q6_k;
16-bit f16, bf16): csrc/cpu's
kernels against float64 references of the dequantized weights, the repacked layout against the
gguf package, GGUF tensors loaded without dequantizing, the engine in each format against its
dequantized-fp32 self, the instruction-set variants against each other, and the one-line errors
of every wrong combination.

Tolerances.  The kernels quantize activations per block of 32 (as llama.cpp does), so against
the exact product W x' a row can be off by at most sum_b (d_b / 2) sum_{j in b} |W[o, j]|
(d_b = max|x'_b| / 127, half a quantization step per value): the tests check that bound, and
against a reference that quantizes x the same way (pf_kernels.quant.quantize_x_reference) they
check fp32 round-off only.  The 16-bit formats do not quantize activations: their bound is 0,
fp32 round-off only.  Weights are random every run of a seed (biases, norms, gates too).
"""
import numpy as np
import pytest
import torch

from kquants import gguf_rows
from pf_kernels import cpu_ops
from pf_kernels.quant import FORMATS, QK, dequantize_reference, quantize, quantize_x_reference, repack, unpack

OK, WHY = cpu_ops.cpu_available()
needs_cpu = pytest.mark.skipif(not OK, reason=f"csrc/cpu unavailable: {WHY}")
FMTS = sorted(FORMATS)
F32 = np.float32


def fit(d_in, fmt):
    """d_in rounded up to what the format's rows need (the K-quants: a multiple of 256)."""
    qk = FORMATS[fmt].qk
    return -(-d_in // qk) * qk


def qweight(rng, O, d_in, fmt):
    """(repacked bytes, dequantized float64 values) of a random [O, d_in] matrix."""
    w = (rng.standard_normal((O, d_in)) / np.sqrt(d_in)).astype(F32)
    g = gguf_rows(w, fmt)
    return repack(g, FORMATS[fmt], d_in), dequantize_reference(g, FORMATS[fmt]).astype(np.float64)


def bf16_tiled(fmt: str, T: int) -> bool:
    """A call of T tokens on a ``fmt`` W takes AMX-BF16 tiles here (csrc/cpu/amx_bf16.h), which
    round the activations to bf16."""
    return fmt == "bf16" and T >= 6 and cpu_ops.bf16_tiles()


def bf16_round(a) -> np.ndarray:
    """a [T, d] (d a multiple of 32) rounded to bf16 by gguf's quantizer (nearest, ties to even),
    as float64: what the tiles multiply."""
    f = FORMATS["bf16"]
    return dequantize_reference(quantize(np.asarray(a, F32), f), f).astype(np.float64)


def act_bound(x64, w64, fmt="q8_0"):
    """[T, O]: the most activation quantization can move W x (half a step per value; for the
    16-bit formats 0, as they dot fp32 activations, but on AMX-BF16 tiles half a bf16 step)."""
    T, d_in = x64.shape
    if FORMATS[fmt].half:
        if bf16_tiled(fmt, T):
            return 2.0 ** -9 * np.abs(x64) @ np.abs(w64).T
        return np.zeros((T, w64.shape[0]))
    step = np.abs(x64).reshape(T, -1, QK).max(-1) / 127                          # [T, nb]
    wsum = np.abs(w64).reshape(w64.shape[0], -1, QK).sum(-1)                      # [O, nb]
    return 0.5 * step @ wsum.T


# ---------------------------------------------------------------------------------------------
# The layout: repack / unpack, dequantize against gguf
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("d_in", [32, 96, 288, 544])
def test_repack_round_trip_and_dequantize_match_gguf(fmt, d_in):
    f = FORMATS[fmt]
    d_in = fit(d_in, fmt) if f.qk == QK else d_in * 8
    rng = np.random.default_rng([d_in, len(fmt), ord(fmt[-1])])
    w = rng.standard_normal((37, d_in)).astype(F32) * rng.uniform(0.01, 3, (37, 1)).astype(F32)
    g = gguf_rows(w, fmt)
    assert g.shape == (37, f.gguf_row_bytes(d_in))
    q = repack(g, f, d_in)
    assert q.shape == (37, f.row_bytes(d_in))
    assert np.array_equal(unpack(q, f, d_in), g)
    if not OK:
        return
    assert cpu_ops.row_bytes(f.code, d_in) == f.row_bytes(d_in)
    want = dequantize_reference(g, f)
    out = np.full((37, d_in), 7.25, F32)
    cpu_ops.dequantize(q, f.code, out, None, 2)
    assert np.array_equal(out, want)
    rows = rng.integers(0, 37, 11)
    sel = np.full((11, d_in), 7.25, F32)
    cpu_ops.dequantize(q, f.code, sel, rows, 1)
    assert np.array_equal(sel, want[rows])


# ---------------------------------------------------------------------------------------------
# LinearPlan with a quantized W, against float64
# ---------------------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("O,d_in", [(37, 32), (70, 160), (33, 544), (129, 96)])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 16])
def test_kernel_matches_quantized_reference(fmt, O, d_in, T):
    """No prologue: against W_deq . quantize(x), fp32 round-off only."""
    d_in = fit(d_in, fmt)
    rng = np.random.default_rng([O, d_in, T, len(fmt), ord(fmt[-1])])
    q, w64 = qweight(rng, O, d_in, fmt)
    b = rng.standard_normal(O).astype(F32)
    x = rng.standard_normal((T, d_in)).astype(F32) * rng.uniform(0.1, 4, (T, 1)).astype(F32)
    x[0, :QK] = 0                                       # an all-zero block (scale 0)
    plan = cpu_ops.LinearPlan(q, O, b, fmt=FORMATS[fmt].code, d_in=d_in)
    assert (plan.d_in, plan.d_out, plan.rank, plan.fmt) == (d_in, O, 0, FORMATS[fmt].code)
    y = np.full((T, O), 7.25, F32)
    plan.run(x, y, threads=2)
    xq = x.astype(np.float64) if FORMATS[fmt].half else quantize_x_reference(x)
    if bf16_tiled(fmt, T):
        xq = bf16_round(x)
    want = xq @ w64.T + b
    assert np.abs(y - want).max() <= 1e-5 * (1 + np.abs(want).max())
    exact = x.astype(np.float64) @ w64.T + b
    assert np.all(np.abs(y - exact) <= act_bound(x.astype(np.float64), w64, fmt) * 1.001 + 1e-4)


@needs_cpu
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "silu_mul"])
@pytest.mark.parametrize("gates", [None, "dense", "top2", "zero-rows"])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_kernel_with_prologues_and_experts(fmt, prologue, gates, T):
    from test_cpu_binding import Group, make_gates, prologue_ref
    pro = {"none": cpu_ops.PRO_NONE, "rmsnorm": cpu_ops.PRO_RMSNORM, "silu_mul": cpu_ops.PRO_SILU_MUL}[prologue]
    rng = np.random.default_rng([T, len(fmt), len(prologue), len(str(gates)), ord(fmt[-1])])
    d_in, K = fit(96, fmt), 5
    grp = Group(rng, d_in, (40, 23), K, skip=(1,) if gates == "top2" else ())
    W = grp.w_aug[:grp.d_out]
    g = gguf_rows(W, fmt)
    w64 = dequantize_reference(g, FORMATS[fmt]).astype(np.float64)
    a_cat = np.ascontiguousarray(grp.w_aug[grp.d_out:])
    plan = cpu_ops.LinearPlan(repack(g, FORMATS[fmt], d_in), grp.d_out, grp.bias, grp.parts, grp.blocks, K,
                              fmt=FORMATS[fmt].code, a_cat=a_cat, d_in=d_in)
    assert plan.rank == grp.R
    width = 2 * d_in if pro == cpu_ops.PRO_SILU_MUL else d_in
    x = rng.standard_normal((T, width)).astype(F32)
    norm = (1 + 0.3 * rng.standard_normal(d_in)).astype(F32)
    eps = 1e-5
    gt = make_gates(gates, rng, T, K)
    res = rng.standard_normal((T, grp.d_out)).astype(F32)
    y = res.copy()
    plan.run(x, y, gt, 2, pro, norm if pro == cpu_ops.PRO_RMSNORM else None, eps, y)
    # the exact reference: the dequantized W, fp64 x', the experts in fp64
    grp.w_aug = np.concatenate([w64.astype(F32), a_cat])      # ref reads W from w_aug
    want = grp.ref(x, gt, pro, norm, eps, res.astype(np.float64))
    xp = prologue_ref(x, pro, norm, eps, d_in)
    bound = act_bound(xp, w64, fmt)
    assert np.all(np.abs(y - want) <= bound * 1.001 + 1e-4 * (1 + np.abs(want).max())), \
        np.abs(y - want).max()


@needs_cpu
def test_activation_quantization_is_what_the_bound_allows():
    """The bound is tight enough to fail: a kernel whose zero point were off by one step (u - 7
    instead of u - 8 for q4_0) would exceed it."""
    rng = np.random.default_rng(3)
    q, w64 = qweight(rng, 50, 160, "q4_0")
    x = rng.standard_normal((2, 160)).astype(F32)
    y = np.empty((2, 50), F32)
    cpu_ops.LinearPlan(q, 50, fmt=FORMATS["q4_0"].code, d_in=160).run(x, y)
    d = np.abs(w64).max() / 8                                    # about one q4_0 step of W
    off_by_one = x.astype(np.float64) @ (w64 + d).T
    exact = x.astype(np.float64) @ w64.T
    bound = act_bound(x.astype(np.float64), w64)
    assert np.all(np.abs(y - exact) <= bound + 1e-4)
    assert np.any(np.abs(off_by_one - exact) > bound)


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written
# ---------------------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("kw,err,words", [
    (dict(fmt=10), ValueError, ["fmt is 10"]),
    (dict(d_in=0), ValueError, ["d_in is 0", "multiple of 32"]),
    (dict(d_in=64), ValueError, ["weight.shape[1]", "row bytes"]),
    (dict(d_out=5), ValueError, ["d_out is 5"]),
    (dict(weight=np.zeros((7, 60), np.float32)), TypeError, ["weight", "uint8"]),
    (dict(a_cat=np.zeros((3, 64), np.float32)), ValueError, ["a_cat", "(3, 64)"]),
])
def test_linear_plan_rejects_bad_quantized_input(kw, err, words):
    f = FORMATS["q4_1"]
    base = dict(weight=np.zeros((7, f.row_bytes(96)), np.uint8), d_out=7, fmt=f.code, d_in=96)
    with pytest.raises(err) as e:
        cpu_ops.LinearPlan(**{**base, **kw})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@needs_cpu
def test_f32_plan_refuses_a_cat():
    with pytest.raises(ValueError, match="a_cat is given with fmt=FMT_F32"):
        cpu_ops.LinearPlan(np.zeros((4, 32), F32), 4, a_cat=np.zeros((1, 32), F32))


@needs_cpu
def test_dequantize_rejects_bad_rows_and_writes_nothing():
    f = FORMATS["q8_0"]
    q = np.zeros((5, f.row_bytes(64)), np.uint8)
    out = np.full((2, 64), 7.25, F32)
    with pytest.raises(ValueError, match=r"rows\[1\] is 5, expected a value in \[0, 4\]"):
        cpu_ops.dequantize(q, f.code, out, np.array([0, 5]), 1)
    assert np.all(out == 7.25)
    with pytest.raises(ValueError, match="weight.shape"):
        cpu_ops.dequantize(q, f.code, np.empty((5, 96), F32), None, 1)


# ---------------------------------------------------------------------------------------------
# GGUF tensors kept quantized; the engine in each format
# ---------------------------------------------------------------------------------------------

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "F16", "BF16"]


def tiny_sizes(qtype):
    """A tiny model's widths: K-quant rows need multiples of 256."""
    return dict(hidden=256, inter=512) if qtype.endswith("_K") else dict(hidden=64, inter=96)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_tensors_read_without_dequantizing(tmp_path, qtype):
    """GGUFSource's QuantWeights hold the file's bytes (Q/K rows un-permuted): dequantized they
    equal gguf_import's fp32 conversion (the gguf package's dequantization), exactly."""
    from gguf_fixtures import write_tiny_gguf
    from pf_engine.model.config import ModelConfig
    from pf_engine.model.gguf_import import convert_gguf
    from pf_engine.model.gguf_weights import GGUFSource
    from pf_engine.model.loading import load_weights
    from pf_engine.model.qweight import QuantWeight
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype=qtype, tied=False, seed=5, **tiny_sizes(qtype))
    folder = convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    cfg = ModelConfig.from_file(str(tmp_path / "hf" / "config.json"))
    q = load_weights(folder, cfg, torch.float32, "cpu", None, str(path))
    f = load_weights(folder, cfg, torch.float32, "cpu")
    for name in ("qkv", "o", "gate_up", "down"):
        wq, wf = getattr(q.layers[1], name), getattr(f.layers[1], name)
        assert isinstance(wq, QuantWeight) and wq.fmt.gguf == qtype
        assert torch.equal(torch.from_numpy(dequantize_reference(wq.gguf_rows(), wq.fmt)), wf)
        if OK:
            assert torch.equal(wq.dequantize(), wf)
    assert isinstance(q.lm_head, QuantWeight) and torch.equal(q.lm_head.dequantize(), f.lm_head)
    ids = torch.tensor([[0, 5, 17], [3, 3, 9]])
    assert torch.equal(q.embed.rows(ids), f.embed[ids])
    assert torch.equal(q.layers[0].attn_norm, f.layers[0].attn_norm)
    assert GGUFSource(str(path), cfg).has("model.embed_tokens.weight")


def tiny_engines(tmp_path, qtype, seed=11):
    """(the engine with the file's formats, the engine with them dequantized to fp32); the
    conversion of the file (config, tokenizer) goes into tmp_path's PF_HOME."""
    from gguf_fixtures import write_tiny_gguf
    from pf_engine import Engine
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(path, qtype=qtype, tied=True, layers=2, seed=seed, **tiny_sizes(qtype))
    q = Engine.from_pretrained(str(path), progress=False)
    f = Engine.from_pretrained(str(path), quantize="f32", progress=False)
    return q, f


@needs_cpu
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_engine_holds_greedy_output_to_its_dequantized_fp32_self(tmp_path, qtype, monkeypatch):
    """The engine with the file's formats kept against the same file dequantized to fp32.  For
    the block formats the only difference is the activations' 8-bit quantization, so logits agree
    to a few percent of their spread and greedy tokens agree wherever fp32's top-2 margins exceed
    twice that gap (at least two prompts of twelve, four tokens each); the 16-bit formats compute with the same
    weights in fp32, so logits agree to fp32
    round-off (1e-4 of the spread) and every greedy token does; bf16 on AMX-BF16 tiles rounds the
    prompts' activations to bf16 (measured 1.1e-3 of the spread: allowed 5e-3)."""
    monkeypatch.setenv("PF_HOME", str(tmp_path))
    q, f = tiny_engines(tmp_path, qtype)
    assert q.weight_formats.startswith(qtype.lower()) and f.weight_formats.startswith("float32")
    rng = np.random.default_rng(len(qtype))
    prompts = [rng.integers(3, q.config.vocab_size, 9).tolist() for _ in range(12)]
    lq, lf = q.logits(prompts), f.logits(prompts)
    gap = (lq - lf).abs().max().item()
    half = qtype in ("F16", "BF16")
    tol = (5e-3 if bf16_tiled(qtype.lower(), 9) else 1e-4) if half else 0.05
    assert gap <= tol * (lf.max() - lf.min()).item(), gap
    clear = kept = 0                   # prompts whose fp32 path has every top-2 margin > 2 gap
    for p in prompts:
        b = f.generate([p], max_new_tokens=4)[0].token_ids
        top2 = f.logits([p + b[:-1]])[0, len(p) - 1:].topk(2, -1).values
        if bool(((top2[:, 0] - top2[:, 1]) > 2 * gap).all()):
            clear += 1
            kept += q.generate([p], max_new_tokens=4)[0].token_ids == b
    assert kept == clear and clear >= (6 if half else 2), f"{kept} of {clear} clear prompts kept fp32's greedy tokens"


@needs_cpu
def test_quantized_decode_and_prefill_agree(tmp_path, monkeypatch):
    """Generation (decode steps in csrc/cpu's BlockPlan) and scoring (prefill chunks through the
    same kernel) of a quantized model see the same logits: each generated token is the argmax of
    the teacher-forced logits at its position."""
    monkeypatch.setenv("PF_HOME", str(tmp_path))
    q, _ = tiny_engines(tmp_path, "Q4_1", seed=4)
    prompt = [5, 9, 33, 70, 4]
    out = q.generate([prompt], max_new_tokens=10)[0].token_ids
    lg = q.logits([prompt + out])[0]
    assert lg[len(prompt) - 1:-1].argmax(-1).tolist() == out


@needs_cpu
@pytest.mark.parametrize("mode", ["q8", "q4", "bf16", "f16"])
def test_hf_folder_quantized_at_load(hf_model_dir, mode):
    """--quantize on an HF folder: projections in q8_0 / q4_1 and the embedding in q8_0, or all
    in a 16-bit format, the result close to the fp32 engine (the weights' rounding on top of the
    activations' quantization)."""
    from pf_engine import Engine
    folder, _ = hf_model_dir("llama", f"tiny-{mode}", hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=384)
    q = Engine.from_pretrained(folder, quantize=mode, progress=False)
    f = Engine.from_pretrained(folder, progress=False)
    assert q.weight_formats == {"q8": "q8_0 + q8_0 embedding", "q4": "q4_1 + q8_0 embedding",
                                "bf16": "bf16 + bf16 embedding", "f16": "f16 + f16 embedding"}[mode]
    ids = [[1, 7, 20, 30, 99, 4]]
    lq, lf = q.logits(ids), f.logits(ids)
    tol = {"q8": 0.15, "q4": 0.15, "bf16": 0.02, "f16": 0.002}[mode]   # bf16: 8 bits of mantissa
    assert (lq - lf).abs().max() <= tol * (lf.max() - lf.min())


@pytest.mark.parametrize("kw,words", [
    (dict(quantize="q5"), ["quantize='q5'", "f32, bf16, f16, q8, q4"]),
    (dict(quantize="q8", backend="torch"), ["backend='torch'", "cpu backend"]),
    (dict(quantize="q4", dtype="bf16"), ["dtype=bfloat16", "fp32"]),
])
def test_bad_quantize_combinations_are_one_line(hf_model_dir, kw, words):
    from pf_engine import Engine
    from pf_engine.errors import PFError
    folder, _ = hf_model_dir("llama", "tiny-bad", hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=384)
    with pytest.raises(PFError) as e:
        Engine.from_pretrained(folder, progress=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_gguf_refuses_requantizing(tmp_path, monkeypatch):
    monkeypatch.setenv("PF_HOME", str(tmp_path))
    from gguf_fixtures import write_tiny_gguf
    from pf_engine import Engine
    from pf_engine.errors import PFError
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, qtype="Q4_1")
    with pytest.raises(PFError, match="GGUF model: its tensors keep the file's own formats"):
        Engine.from_pretrained(str(path), quantize="q8", progress=False)


def test_quantizing_rows_not_a_multiple_of_32_names_the_tensor(hf_model_dir):
    from pf_engine import Engine
    from pf_engine.errors import LoadError
    folder, _ = hf_model_dir("llama", "tiny-odd", hidden_size=48, intermediate_size=80,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=384)
    if not OK:
        pytest.skip(WHY)
    with pytest.raises(LoadError, match=r"model.layers.0.self_attn.q_proj.weight has shape \[48, 48\]; "
                                        r"q4_1 needs rows of a multiple of 32"):
        Engine.from_pretrained(folder, quantize="q4", progress=False)


def test_fused_projections_of_mixed_32_blocks_widen_to_q8_0_exactly():
    """llama.cpp's Q4_K_M stores some layers' v in q8_0 beside q, k in q5_0: the fused qkv keeps
    every value (q4_0 / q5_0 widen to q8_0 exactly), and formats that cannot widen fall back to
    fp32."""
    from pf_engine.model import quantize as qz
    from pf_engine.model.qweight import QuantWeight
    rng = np.random.default_rng(12)
    ws = [QuantWeight.from_gguf(gguf_rows(rng.standard_normal((n, 96)).astype(F32), f), FORMATS[f], 96)
          for n, f in ((40, "q5_0"), (8, "q4_0"), (8, "q8_0"))]
    fused = qz.cat(ws)
    assert isinstance(fused, QuantWeight) and fused.fmt.name == "q8_0" and fused.shape == (56, 96)
    want = np.concatenate([dequantize_reference(w.gguf_rows(), w.fmt) for w in ws])
    assert np.array_equal(dequantize_reference(fused.gguf_rows(), fused.fmt), want)
    q41 = QuantWeight.from_gguf(gguf_rows(rng.standard_normal((8, 96)).astype(F32), "q4_1"), FORMATS["q4_1"], 96)
    mixed = qz.cat([ws[0], q41])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (48, 96)
