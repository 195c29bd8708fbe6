"""The engine's GPU paths, every backend (torch, naive, triton, cuda) on a CUDA device.

Skipped as a whole without a GPU; a backend that cannot run on the GPU here (triton not
installed, the CUDA extension not built) skips with the reason.  References are independent of
the backend under test: fp64 x W^T + b + grouped_lora_ref for one model.linear.Linear (the weights
rounded to the tested dtype first, so only the arithmetic differs), and the fp32 CPU engine
(itself checked against transformers and PEFT in test_runtime / test_persona) for whole models.
"""
import pytest
import torch

from pf_engine import Engine
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.backends import BACKENDS, backend_status
from pf_engine.persona.mix import Mix
from test_mixing import NAMES, gate_patterns, make_bank, make_linear, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no GPU (torch.cuda.is_available() is False)")

CUDA = torch.device("cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# relative to 1 + max|reference|: fp32 as on CPU; bf16 rounds x, h and y (2^-9 each) plus sums
TOL = {"fp32": 1e-5, "bf16": 2e-2}


def need(backend):
    ok, why = backend_status(backend, CUDA)
    if not ok:
        pytest.skip(f"backend {backend} unusable on the GPU: {why}")


@pytest.fixture(scope="module")
def gpu_banks():
    return {name: make_bank().to(dt, CUDA) for name, dt in DTYPES.items()}


# One Linear on the GPU vs fp64 -------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", ["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("T", [1, 7, 40])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_linear_on_gpu_matches_fp64(gpu_banks, backend, group, T, dtype):
    need(backend)
    bank = gpu_banks[dtype]
    lin, w, b, shapes = make_linear(bank, group, True, seed=T, backend=backend)
    assert lin.weight.device.type == "cuda" and lin.weight.dtype == DTYPES[dtype]
    g = torch.Generator().manual_seed(1000 + T)
    x = torch.randn(1, T, shapes[0][1], generator=g).to(DTYPES[dtype])
    for name, gates in gate_patterns(T, len(NAMES), g).items():
        want = reference(bank, group, w, b, shapes, x[0].double(), gates)
        out = lin(x.to(CUDA), Mix(gates.to(CUDA)))
        got = torch.cat(out, -1) if isinstance(out, tuple) else out
        assert got.device.type == "cuda" and got.dtype == DTYPES[dtype]
        err = (got[0].double().cpu() - want).abs().max().item()
        assert err <= TOL[dtype] * (1 + want.abs().max().item()), (name, err)


# Whole models: the GPU engine vs the CPU fp32 engine ----------------------------------------------
PERSONAS = {
    "dense": [{n: 0.1 * (i + 1) for i, n in enumerate(BIG_FIVE)}] * 3,
    "mixed_rows": [{BIG_FIVE[0]: 0.7, BIG_FIVE[3]: 0.3}, None, {BIG_FIVE[4]: 1.2}],
    "token": ["token", None, {BIG_FIVE[2]: 0.9, BIG_FIVE[8]: 0.4}],
}


@pytest.fixture(scope="module")
def model_and_bank(hf_model_dir):
    from pf_engine.model.config import ModelConfig
    folder, _ = hf_model_dir("llama", "gpu_base")
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=[4, 8, 16, 8, 4, 2, 8, 16, 4, 8], seed=11, router=True)
    cpu = Engine.from_pretrained(folder, adapters=bank, backend="torch", progress=False,
                                 device="cpu", dtype="fp32")
    return folder, bank, cpu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(PERSONAS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_engine_logits_on_gpu_match_cpu(model_and_bank, backend, case, dtype):
    need(backend)
    folder, bank, cpu = model_and_bank
    eng = Engine.from_pretrained(folder, adapters=bank, backend=backend, progress=False,
                                 device="cuda", dtype=dtype)
    ids = torch.randint(3, 256, (3, 11), generator=torch.Generator().manual_seed(5))
    want = cpu.logits(ids, persona=PERSONAS[case])
    got = eng.logits(ids, persona=PERSONAS[case]).cpu()
    err = (got - want).abs().max().item()
    # bf16 through a whole (tiny) model: a few roundings per layer on logits of size ~10
    tol = {"fp32": 1e-4, "bf16": 0.05}[dtype] * (1 + want.abs().max().item())
    assert err <= tol, err
    assert (want - cpu.logits(ids)).abs().max() > 1e-2          # the experts did something


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_generation_on_gpu_matches_cpu(model_and_bank, backend):
    """fp32 greedy decoding (prefill, KV cache, per-row personas, token routing) on the GPU gives
    the CPU engine's tokens."""
    need(backend)
    folder, bank, cpu = model_and_bank
    eng = Engine.from_pretrained(folder, adapters=bank, backend=backend, progress=False,
                                 device="cuda", dtype="fp32")
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (4, 9, 6)]
    persona = PERSONAS["token"]
    want = cpu.generate(prompts, max_new_tokens=8, persona=persona)
    got = eng.generate(prompts, max_new_tokens=8, persona=persona)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_decode_matches_dynamic(model_and_bank, backend):
    """The scheduler's decode captured in CUDA graphs (runtime/static_decode.py) gives the dynamic step's
    tokens, with requests joining and leaving (several batch buckets, padding rows) and every
    persona kind; replays reuse the captured graphs."""
    from test_scheduler import run_arrivals
    need(backend)
    folder, bank, _ = model_and_bank
    eng = Engine.from_pretrained(folder, adapters=bank, backend=backend, progress=False,
                                 device="cuda", dtype="fp32")
    kinds = [None, {BIG_FIVE[0]: 0.7, BIG_FIVE[3]: 0.3}, "auto", "token"]
    specs = [(torch.randint(3, 256, (3 + 2 * i,), generator=torch.Generator().manual_seed(i)).tolist(),
              kinds[i % 4], 4 + 3 * (i % 3)) for i in range(7)]
    arrive = [0, 0, 1, 2, 2, 5, 6]
    out = {}
    for mode in ("dynamic", "graphs"):
        sched = eng.new_scheduler(slots=4, max_len=64, prefill_budget=8, background=False, decode=mode)
        out[mode] = [r.result().token_ids for r in run_arrivals(sched, specs, arrive)]
        if mode == "graphs":
            assert 1 <= len(sched.static._captured) < sched.steps       # replayed, not recaptured
    assert out["graphs"] == out["dynamic"]
