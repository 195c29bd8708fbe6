"""Batch-invariant greedy decoding on the default path (issue 36): a request's greedy tokens are
the same alone, batched with 8 other prompts, and with its prompt prefilled in 7-token chunks,
for every persona kind.  On the cpu backend every step on the slot cache takes csrc/cpu's
attention (backends/cpu/attention.py: each token sums its own columns in order) and the 4-bit
products are the kernel's, row by row.  Without it (torch's attention in prefill) 4 of 9
comparisons on the bundled model differed.

Two models: the bundled SmolLM2 as shipped (4-bit, the shipped bigfive bank; slow), and a tiny
random Llama quantized to q4 at load with a random bank that has both routers.
"""
import pytest
import torch

from pf_engine import Engine
from pf_engine.backends import backend_status
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
    from conftest import TINY
    torch.manual_seed(5)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**dict(TINY, hidden_size=128, intermediate_size=256,
                                                      num_attention_heads=4))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    folder = tmp_path_factory.mktemp("close_call")
    model.save_pretrained(folder)
    return str(folder)


def test_a_tiny_4bit_model_every_persona_kind(close_call_model):
    folder = close_call_model
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=4, seed=3, router=True)
    eng = Engine.from_pretrained(folder, adapters=bank, backend="cpu", quantize="q4",
                                 progress=False, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(9, 40, (9,), generator=g)]
    assert differences(eng, prompts, [None, EXPLICIT, "auto", "token"], 32, 3) == []
