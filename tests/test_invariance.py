"""Batch-invariant greedy decoding on the default path (issue 36): a request's greedy tokens are
the same alone, batched with 8 other prompts, and with its prompt prefilled in 7-token chunks,
for every persona kind.  On the cpu backend every step on the slot cache takes csrc/cpu's
attention (backends/cpu/attention.py: each token sums its own columns in order) and the 4-bit
products are the kernel's, row by row.  Without it (torch's attention in prefill) 4 of 9
comparisons on the bundled model differed.

Two models: the bundled SmolLM2 as shipped (4-bit, the shipped bigfive bank; slow), and a tiny
random Llama with nearly tied logits, quantized to q4 at load or kept in fp32 with
``deterministic=True`` (every fp32 product the kernel's; without it 13 of 24 comparisons differed,
the batched and chunked prefills taking torch's GEMMs), with a random bank that has both routers;
the fp32 one also through a real pf-serve.
"""
import concurrent.futures as cf
import time

import httpx
import pytest
import torch

from pf_engine import Engine
from pf_engine.backends import backend_status
from pf_engine.errors import PFError
from pf_engine.generation.sampling import SamplingParams
from pf_engine.model.config import ModelConfig
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.runtime.config import SchedulerConfig
from pf_engine.runtime.scheduler import Scheduler

pytestmark = pytest.mark.skipif(not backend_status("cpu", torch.device("cpu"))[0],
                                reason="the cpu backend (csrc/cpu) is not built here")
EXPLICIT = {BIG_FIVE[4]: 0.8, BIG_FIVE[6]: 0.4}


def greedy(eng, prompts, personas, n: int, budget: int = 4096) -> list[list]:
    """Each prompt's greedy tokens with their logprobs (floats compared exactly: a different
    rounding anywhere shows there even where it flips no token)."""
    sched = Scheduler(eng, SchedulerConfig(len(prompts), 512, budget, background=False,
                                           decode="dynamic", prefix_cache=None))
    reqs = [sched.submit(p, SamplingParams(max_new_tokens=n, logprobs=0), s)
            for p, s in zip(prompts, personas)]
    sched.run()
    return [[(t, lp.logprob) for t, lp in zip(r.result().token_ids, r.result().logprobs)]
            for r in reqs]


def differences(eng, prompts, kinds, n: int, first: int) -> list[str]:
    """Where the first ``first`` prompts' tokens (and logprobs) alone differ from batched or
    chunked ones."""
    out = []
    for kind in kinds:
        batched = greedy(eng, prompts, [kind] * len(prompts), n)
        for i in range(first):
            alone = greedy(eng, [prompts[i]], [kind], n)[0]
            chunked = greedy(eng, [prompts[i]], [kind], n, budget=7)[0]
            out += [f"{kind} prompt {i} {what}" for what, got in (("batched", batched[i]),
                                                                 ("chunked", chunked))
                    if got != alone]
    return out


@pytest.mark.slow
def test_the_bundled_model_as_shipped(bundled_pf_home):
    eng = Engine.from_pretrained(adapters="bigfive", progress=False)
    assert eng.backend.name == "cpu" and "q4_1" in eng.weight_formats
    msgs = ["The hotel lost my reservation and the receptionist laughed at me.",
            "Can you explain how photosynthesis works?", "I just lost my job.",
            "Write a haiku about autumn.", "What is the capital of France?",
            "My friend never answers my messages.", "How do I cook rice?",
            "Tell me a joke about cats.", "Why is the sky blue?"]
    prompts = eng._encode(msgs, True)
    assert differences(eng, prompts, [None, "auto", EXPLICIT], 64, 2) == []


@pytest.fixture(scope="module")
def close_call_model(tmp_path_factory):
    """A tiny random Llama left at transformers' initialisation (std 0.02; norms perturbed):
    its logits are nearly tied, so a rounding difference anywhere changes a greedy token."""
    import transformers as tf
    from conftest import TINY, save_tiny_tokenizer
    folder = tmp_path_factory.mktemp("close_call")
    save_tiny_tokenizer(folder)
    vocab = len(tf.AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(5)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**dict(TINY, hidden_size=128, intermediate_size=256,
                                                      num_attention_heads=4,
                                                      vocab_size=vocab))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(folder)
    return str(folder)


def tiny_engine(folder, **kw):
    bank = AdapterBank.random(ModelConfig.from_file(f"{folder}/config.json"), rank=4, seed=3,
                              router=True)
    return Engine.from_pretrained(folder, adapters=bank, backend="cpu", progress=False,
                                  device="cpu", **kw)


def random_prompts(n: int = 9) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, 256, (int(k),), generator=g).tolist()
            for k in torch.randint(9, 40, (n,), generator=g)]


@pytest.mark.parametrize("kw", [dict(quantize="q4"), dict(deterministic=True)],
                         ids=["q4", "fp32-deterministic"])
def test_a_tiny_model_every_persona_kind(close_call_model, kw):
    eng = tiny_engine(close_call_model, **kw)
    assert eng.batch_invariant
    assert differences(eng, random_prompts(), [None, EXPLICIT, "auto", "token"], 32, 3) == []


@pytest.mark.parametrize("kw", [dict(quantize="q4"), dict(deterministic=True)],
                         ids=["q4", "fp32-deterministic"])
def test_more_rows_than_one_fused_decode_step(close_call_model, kw):
    """A batch of more than MAX_ROWS requests decodes in the fused step's row chunks, as each
    request alone does (model.decoder.Block's torch norms and RoPE round otherwise: the bundled
    model's base reply to a held-out fact question differed at its 7th token in a batch of 48)."""
    from pf_engine.backends.cpu.kernel import MAX_ROWS
    eng = tiny_engine(close_call_model, **kw)
    prompts = random_prompts(2 * MAX_ROWS + 3)
    assert differences(eng, prompts, [None, EXPLICIT, "token"], 24, 3) == []


def test_fp32_without_the_switch_is_not_claimed_invariant(close_call_model):
    assert not tiny_engine(close_call_model).batch_invariant


def test_bf16_is_claimed_invariant_only_where_it_holds(close_call_model):
    """A bf16 W's prefill takes AMX-BF16 tiles where the CPU has them (csrc/cpu/amx_bf16.h),
    whose sums are not the decode dots': then the engine does not claim invariance, unless
    deterministic=True, which keeps every bf16 product on the dots (checked token for token)."""
    from pf_kernels import cpu_ops
    assert tiny_engine(close_call_model, quantize="bf16").batch_invariant == (not cpu_ops.bf16_tiles())
    eng = tiny_engine(close_call_model, quantize="bf16", deterministic=True)
    assert eng.batch_invariant
    assert differences(eng, random_prompts(), [None, EXPLICIT], 32, 3) == []


def test_the_switch_where_it_cannot_hold_is_one_line(close_call_model):
    with pytest.raises(PFError, match=r"^deterministic=True: .*cpu backend only.*'torch'"):
        Engine.from_pretrained(close_call_model, backend="torch", deterministic=True,
                               progress=False, device="cpu")


def idle(eng):
    """``eng`` once its scheduler has retired its last request (a response can reach the client
    a step before that)."""
    deadline = time.monotonic() + 30
    while eng.scheduler().pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    return eng


def completion(url: str, prompt: list[int], persona) -> list:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "logprobs": 0, "persona": persona}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return list(zip(lp["tokens"], lp["token_logprobs"]))


@pytest.mark.parametrize("kw", [dict(quantize="q4"), dict(deterministic=True)],
                         ids=["q4", "fp32-deterministic"])
def test_through_pf_serve_alone_in_a_burst_and_chunked(close_call_model, kw):
    """A real pf-serve (uvicorn on 127.0.0.1) over the 4-bit model, and the fp32 one with
    deterministic=True: each greedy completion's tokens and logprobs are the same alone, in a
    burst of 9 held until all are admitted (so that they prefill and decode as one batch), and
    prefilled in 7-token chunks."""
    pytest.importorskip("uvicorn")
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    eng = tiny_engine(close_call_model, **kw)
    eng.set_prefix_cache(0)            # each run computes every prompt token itself
    prompts, personas = random_prompts(), [None, EXPLICIT, "auto"] * 3
    s = ThreadedServer(build_app(eng, "tiny", max_queue=16, timeout_s=60))
    try:
        eng.new_scheduler(slots=1, max_len=128)
        alone = [completion(s.url, p, k) for p, k in zip(prompts, personas)]
        idle(eng).new_scheduler(slots=1, max_len=128, prefill_budget=7)
        chunked = [completion(s.url, p, k) for p, k in zip(prompts, personas)]
        idle(eng).new_scheduler(slots=9, max_len=128)
        sched = eng.scheduler()
        sched.pause()
        with cf.ThreadPoolExecutor(9) as pool:
            futs = [pool.submit(completion, s.url, p, k) for p, k in zip(prompts, personas)]
            deadline = time.monotonic() + 30
            while len(sched.waiting) < 9 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(sched.waiting) == 9
            sched.resume()
            burst = [f.result(timeout=60) for f in futs]
    finally:
        s.close()
    assert [i for i in range(9) if chunked[i] != alone[i]] == []
    assert [i for i in range(9) if burst[i] != alone[i]] == []


@pytest.mark.parametrize("cli", ["generate", "serve"])
def test_the_cli_switch_reaches_the_engine_and_refuses_in_one_line(close_call_model, capsys, cli):
    import importlib
    main = importlib.import_module(f"pf_engine.cli.{cli}").main
    args = ["--model", close_call_model, "--backend", "torch", "--deterministic", "--device", "cpu"]
    assert main(args + (["hi"] if cli == "generate" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert "deterministic=True" in err and "'torch'" in err and "\n" not in err, err
