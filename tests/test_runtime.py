"""The decoder runtime against transformers, offline, on tiny random models (fp32)."""
import pytest
import torch

from pf_engine import Engine
from pf_engine.model.kv_cache import SlotCache

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name -> (architecture, shard, config overrides)
MODELS = {
    "llama_untied": ("llama", False, {}),
    "llama_tied_llama3": ("llama", False, dict(tie_word_embeddings=True, head_dim=32,
                                               rope_scaling=LLAMA3_ROPE)),
    "mistral_window": ("mistral", False, dict(sliding_window=8)),
    "qwen2_sharded": ("qwen2", True, {}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, hf_model_dir):
    arch, shard, kw = MODELS[request.param]
    folder, hf = hf_model_dir(arch, request.param, shard=shard, **kw)
    return Engine.from_pretrained(folder, device="cpu", dtype="fp32"), hf


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_sharded_fixture_really_is_sharded(hf_model_dir):
    import os
    folder, _ = hf_model_dir("qwen2", "qwen2_sharded", shard=True)
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))


def test_fixture_parameters_are_random_and_a_lost_bias_is_caught(hf_model_dir):
    """Norm weights and q/k/v biases are random, so an engine that drops one fails parity."""
    folder, hf = hf_model_dir("qwen2", "qwen2_sharded", shard=True)
    sd = hf.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.input_layernorm.weight",
                "model.norm.weight"):
        assert sd[key].std() > 0.1, key
    eng = Engine.from_pretrained(folder, device="cpu", dtype="fp32")
    ids = torch.randint(3, eng.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (eng.logits(ids) - ref).abs().max().item() <= 1e-4
    for blk in eng.model.blocks:           # what a loader that ignored the bias would build
        blk.qkv.bias = None
    assert (eng.logits(ids) - ref).abs().max().item() > 1e-2


def test_logits_match_transformers(pair):
    eng, hf = pair
    ids = torch.randint(3, eng.config.vocab_size, (3, 24))   # 24 > the Mistral window of 8
    ours = eng.logits(ids)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_generate_matches_transformers(pair):
    eng, hf = pair
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(3, eng.config.vocab_size, (11,), generator=g).tolist()
        out = eng.generate(ids, max_new_tokens=32)[0]
        assert out.token_ids == hf_greedy(hf, ids, 32)
        assert out.finish_reason == ("stop" if out.token_ids[-1] in eng.eos_ids else "length")


def test_cached_decode_equals_full_recompute(pair):
    """Prefill + one-token decode steps through the KV cache give the full forward's logits."""
    eng, _ = pair
    m, T = eng.model, 20
    ids = torch.randint(3, eng.config.vocab_size, (2, T))
    full = eng.logits(ids)
    with torch.inference_mode():
        c = eng.config
        cache = SlotCache(c.num_hidden_layers, 2, c.num_key_value_heads, T, c.head_dim, m.dtype, "cpu")
        P = 5
        view = cache.rows_view(0, [0, 0], [P, P])
        step = [m(ids[:, :P], view.positions, view, view.mask(c.sliding_window))]
        for col in range(P, T):
            view = cache.rows_view(0, [col, col], [1, 1])
            step.append(m(ids[:, col:col + 1], view.positions, view, view.mask(c.sliding_window)))
    assert (torch.cat(step, 1) - full).abs().max().item() <= 1e-4


def test_batch_of_different_lengths_equals_each_alone(pair):
    eng, _ = pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, eng.config.vocab_size, (n,), generator=g).tolist()
               for n in (3, 17, 9, 1)]
    batch = eng.generate(prompts, max_new_tokens=12)
    for p, out in zip(prompts, batch):
        alone = eng.generate(p, max_new_tokens=12)[0]
        assert out.token_ids == alone.token_ids
        assert out.finish_reason == alone.finish_reason
        assert out.usage == {"prompt_tokens": len(p), "completion_tokens": len(out.token_ids)}


def test_early_finishers_leave_the_batch(hf_model_dir):
    folder, _ = hf_model_dir("llama", "llama_untied")
    eng = Engine.from_pretrained(folder, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (6,), generator=g).tolist() for _ in range(3)]
    # Request 0 gets a short budget by being alone with max 2; in a batch the budget is shared, so
    # make it stop early with an EOS: pick the EOS id as the token it will produce second.
    first = eng.generate(prompts[0], max_new_tokens=2)[0].token_ids
    eng.eos_ids = {first[1]}
    outs = eng.generate(prompts, max_new_tokens=10)
    assert outs[0].token_ids == first[:2] and outs[0].finish_reason == "stop"
    # decode work counted per active request: request 0 stopped after its 2nd token
    assert eng.stats.decode_tokens == sum(len(o.token_ids) for o in outs) - len(outs)
    for p, o in zip(prompts[1:], outs[1:]):
        assert o.token_ids == eng.generate(p, max_new_tokens=10)[0].token_ids


def test_sampling_is_reproducible_with_a_seed(hf_model_dir):
    folder, _ = hf_model_dir("llama", "llama_untied")
    eng = Engine.from_pretrained(folder, device="cpu", dtype="fp32")
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2)
    a = eng.generate([[5, 6, 7], [8, 9]], seed=1234, **kw)
    b = eng.generate([[5, 6, 7], [8, 9]], seed=1234, **kw)
    c = eng.generate([[5, 6, 7], [8, 9]], seed=99, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # request i is seeded with seed + i whatever shares the batch
    alone = eng.generate([8, 9], seed=1235, **kw)[0]
    assert alone.token_ids == a[1].token_ids


def test_bf16_runs_close_to_fp32(hf_model_dir):
    folder, hf = hf_model_dir("llama", "llama_untied")
    eng = Engine.from_pretrained(folder, device="cpu", dtype="bf16")
    ids = torch.randint(3, 256, (2, 10))
    ref = hf(ids).logits.detach()
    got = eng.logits(ids)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
