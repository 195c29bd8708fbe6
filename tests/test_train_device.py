"""pf-train beyond the bundled model on the CPU: gradient checkpointing, a bf16 base with fp32
adapters (what --device cuda runs), any Llama-family folder or a GGUF, sequence cuts, and the
cuda recipe itself (skipped without a GPU)."""
import os

import numpy as np
import pytest
import torch

from conftest import build_hf_model, save_tiny_tokenizer
from pf_engine.errors import PFError
from pf_engine.train.experts import Item, Trunk, load_hf_model
from pf_engine.train.sequences import Sequence

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "personas")


def _peft(folder, dtype=torch.float32, checkpointing=False):
    from peft import LoraConfig, get_peft_model
    hf = load_hf_model(folder, dtype)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                       target_modules=["q_proj", "v_proj", "down_proj"],
                                       layers_to_transform=[1]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm, Trunk(hf, 1, checkpointing)


def _items(seed=2, n=3):
    rng = np.random.default_rng(seed)
    return [Item(Sequence(rng.integers(3, 200, 6).tolist(), rng.integers(3, 200, 7).tolist()))
            for _ in range(n)]


def _grads(folder, checkpointing):
    pm, trunk = _peft(folder, checkpointing=checkpointing)
    items = _items()
    trunk.cache(items)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -trunk.log_likelihood(items).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved)


def test_checkpointing_gives_the_same_gradients_keeping_less(tiny_chat_model):
    """Recomputing the top layers in backward: the loss and every adapter gradient as without
    (to fp32 rounding), with fewer activation values kept for the backward pass."""
    l0, g0, kept0 = _grads(tiny_chat_model[0], False)
    l1, g1, kept1 = _grads(tiny_chat_model[0], True)
    assert l0 == pytest.approx(l1, abs=1e-6) and g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)
    assert kept1 < kept0 / 2


def test_bf16_base_keeps_fp32_adapters_and_trains(tiny_chat_model):
    """The --device cuda arithmetic on the CPU: a bf16 base, fp32 LoRA weights (peft's
    autocast), log-likelihoods within bf16 rounding of the fp32 model's, and steps that train."""
    from pf_engine.train.experts import Pools, train_expert
    from pf_engine.train.recipe import Recipe
    pm32, t32 = _peft(tiny_chat_model[0])
    pm16, t16 = _peft(tiny_chat_model[0], torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in pm16.named_parameters() if "lora_" in n)
    assert t16.model.lm_head.weight.dtype == torch.bfloat16
    items32, items16 = _items(), _items()
    t32.cache(items32)
    t16.cache(items16)
    assert items16[0].hidden.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = t32.log_likelihood(items32), t16.log_likelihood(items16)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()
    for it in items16:
        it.base_lp = 0.0
    params = [p for p in pm16.parameters() if p.requires_grad]
    rc = Recipe(steps=6, lr=1e-2, pairs=3, retain=0, distill=0, w_kl=0.0, w_pair=0.0)
    log, _ = train_expert(t16, params, Pools(items16, items16, [], []), rc, seed=0)
    assert log[-1]["nll"] < log[0]["nll"]


def test_max_len_cuts_the_reply_keeps_the_prompt(tiny_chat_model):
    from pf_engine.tokenizer import Tokenizer
    from pf_engine.train.sequences import ChatEncoder
    hf = Tokenizer(tiny_chat_model[0]).hf
    reply = "one two three four five six seven eight nine ten " * 8
    full = ChatEncoder(hf).sequence("hello there", reply)
    cut = ChatEncoder(hf, max_len=len(full.prompt) + 5).sequence("hello there", reply)
    assert cut.prompt == full.prompt and cut.reply == full.reply[:5]
    tiny = ChatEncoder(hf, max_len=2).sequence("hello there", reply)
    assert tiny.prompt == full.prompt and len(tiny.reply) == 1


@pytest.mark.parametrize("device,dtype,quantize,words", [
    ("tpu", None, None, "expected cpu or cuda"),
    ("cpu", "bf16", None, "computes in fp32"),
    ("cpu", "int8", None, "expected fp32, bf16 or fp16"),
])
def test_compute_device_errors(device, dtype, quantize, words):
    from pf_engine.train.recipe import Recipe, compute_device
    with pytest.raises(PFError, match=words):
        compute_device(Recipe(device=device, dtype=dtype, quantize=quantize))
    assert compute_device(Recipe()) == (torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """Factory: a tiny chat model folder of a Llama-family architecture."""
    def make(arch):
        folder = tmp_path_factory.mktemp(f"tiny_{arch}")
        save_tiny_tokenizer(folder)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder)
        build_hf_model(arch, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id).save_pretrained(folder)
        return str(folder)
    return make


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gguf"])
def test_quick_recipe_on_other_llama_family_models(arch, family_model, tmp_path):
    """The quick recipe (every stage) trains a bank that loads and routes on a Qwen2 and a
    Mistral folder and on a GGUF file; on Mistral with the cuda recipe's gradient checkpointing
    and the routed preference stage too (the routed stages' backward passes recompute)."""
    from pf_engine import Engine
    from pf_engine.train import Recipe, train_bank
    if arch == "gguf":
        from gguf_fixtures import write_tiny_gguf
        model = str(tmp_path / "tiny-q8_0.gguf")
        write_tiny_gguf(model, qtype="Q8_0", tied=True, seed=7)
    else:
        model = family_model(arch)
    out = tmp_path / "bank.safetensors"
    extra = (dict(checkpointing=True, route_pref_steps=2, route_pref_situations=2)
             if arch == "mistral" else {})
    recipe = Recipe.quick(**extra)
    bank = train_bank(DATA, out, model=model, recipe=recipe, progress=False)
    assert ("routed_preference" in bank.recipe) == bool(extra)
    assert bank.recipe["joint"]["steps"] == 2 and bank.recipe["served"]["device"] == "cpu"
    assert bank.recipe["recipe"]["max_len"] == 512 and bank.recipe["memory"] is None
    assert recipe.max_len == 0                     # the caller's recipe is left as it was
    eng = Engine.from_pretrained(model, adapters=str(out), device="cpu", progress=False)
    got = eng.generate("I feel a bit lost today.", chat=True, persona="auto", max_new_tokens=2)[0]
    assert got.gates["kind"] == "sequence"


def test_cuda_recipe_path_on_the_cpu(tiny_chat_model, tmp_path, monkeypatch):
    """What --device cuda runs, but on the CPU: a bf16 base, checkpointing, the memory plan's
    sizes (faked: 64 tokens, the head in chunks of 8, caches 3 rows at a time) through every
    stage, the routed preference one too; the plan is made before the training copy loads and
    again after, and lands in the metadata.  (Planned sizes once split a routed batch.)"""
    from pf_engine.train import Recipe, recipe as R, train_bank
    from pf_engine.train.memory import Plan
    plans = []

    def fake_plan(model_dir, recipe, dev, dtype, loaded=False):
        plans.append((loaded, recipe.max_len, dtype))
        return Plan(64, 8, 3, 2**30, 0)
    monkeypatch.setattr(R, "memory_plan", fake_plan)
    monkeypatch.setattr(R, "compute_device", lambda recipe: (torch.device("cpu"), "bf16"))
    recipe = Recipe.quick(checkpointing=True, route_pref_steps=2, route_pref_situations=2)
    bank = train_bank(DATA, tmp_path / "b.safetensors", model=tiny_chat_model[0], recipe=recipe,
                      progress=False)
    assert plans == [(False, 0, "bf16"), (True, 64, "bf16")]
    assert bank.recipe["memory"]["head_chunk"] == 8 and bank.recipe["recipe"]["max_len"] == 64
    assert bank.recipe["served"]["dtype"] == "bf16" and "routed_preference" in bank.recipe
    assert bank.recipe["joint"]["steps"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_recipe_on_cuda(tiny_chat_model, tmp_path):
    """--device cuda: bf16 base, checkpointing on, the bank written and served on the GPU."""
    from pf_engine import Engine
    from pf_engine.train import Recipe, train_bank
    out = tmp_path / "bank.safetensors"
    bank = train_bank(DATA, out, model=tiny_chat_model[0], recipe=Recipe.quick(device="cuda"),
                      progress=False)
    assert bank.recipe["served"]["device"] == "cuda" and bank.recipe["served"]["dtype"] == "bf16"
    eng = Engine.from_pretrained(tiny_chat_model[0], adapters=str(out), device="cuda",
                                 progress=False)
    assert eng.generate("hello", chat=True, persona="auto", max_new_tokens=2)[0].gates
