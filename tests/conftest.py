"""Shared fixtures: tiny random HF models saved with save_pretrained (real safetensors)."""
import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2)


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny random transformers model of ``arch`` (llama, mistral, qwen2) in fp32, eval mode."""
    import transformers as tf
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    kw = dict(TINY)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # random init gives near-uniform logits: widen them so greedy is decisive
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0)
            elif "norm" in name:          # norms and biases random too: a loader that drops
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))    # one must fail
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Factory: (arch, name, shard=False, **config overrides) -> (folder, transformers model)."""
    made = {}

    def make(arch: str, name: str, shard: bool = False, **overrides):
        if name not in made:
            model = build_hf_model(arch, **overrides)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder, max_shard_size="200KB" if shard else "10GB")
            made[name] = (str(folder), model)
        return made[name]
    return make


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(folder, vocab_size: int = 384) -> None:
    """A byte-level BPE trained on a fixed text: deterministic, offline, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ("the quick brown fox jumps over the lazy dog. persona experts mix per token. "
            "hello world, bonjour le monde, caf\u00e9 na\u00efve \u00fcber. ") * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>",
                                  "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny Llama with a real tokenizer.json and chat template: (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("tiny_chat")
    save_tiny_tokenizer(folder)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = build_hf_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    return str(folder), model


from gguf_fixtures import bundled_pf_home, converted_smollm2  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (about a minute); it runs in .ci/run")


@contextlib.contextmanager
def bank_server(folder, seed: int):
    """A pf-serve (ThreadedServer, model id "tiny") over the tiny chat model in ``folder`` with a
    seeded random bank of the Big Five poles and its routers, and the real openai client on it:
    (server, client, bank); closed on exit."""
    import openai
    from pf_engine import Engine
    from pf_engine.model.config import ModelConfig
    from pf_engine.persona.bank import AdapterBank
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    bank = AdapterBank.random(ModelConfig.from_file(f"{folder}/config.json"), rank=4, seed=seed,
                              router=True)
    eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")
    eng.new_scheduler(slots=4, max_len=128)
    s = ThreadedServer(build_app(eng, "tiny", timeout_s=60))
    try:
        yield s, openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60), bank
    finally:
        s.close()
