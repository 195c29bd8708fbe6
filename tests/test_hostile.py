"""Hostile files: corrupted inputs as a new user's broken downloads would be.

Seeded and bounded: mutated adapter-bank bytes, bank metadata values of the wrong type or range,
config.json fields set to null / -1 / 0 / "x" / [] / {} / huge, mutated safetensors headers of a
model, mutated GGUF bytes.  Each case must either load (a harmless mutation) or raise a PFError
whose message is one line; any other exception, a multi-line message or a case that runs past
its time limit fails the test, naming the case.
"""
import json
import os
import random
import shutil
import signal
import struct
import time

import pytest

from pf_engine import Engine
from pf_engine.persona.bank import AdapterBank
from pf_engine.model.config import ModelConfig
from pf_engine.errors import PFError

CASE_SECONDS = 30          # a case that takes longer counts as a hang
MAX_MESSAGE = 600

WRONG = [None, -1, 0, "x", [], {}, [None], {"a": 1}, 1e12, True, 2.5]


class Hang(Exception):
    pass


def outcome(case: str, fn) -> str:
    """'ok' or 'refused' (a one-line PFError); anything else fails, naming ``case``."""
    def on_alarm(signum, frame):
        raise Hang(f"{case}: still running after {CASE_SECONDS} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        fn()
        return "ok"
    except PFError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) <= MAX_MESSAGE, f"{case}: message {msg!r}"
        return "refused"
    except Hang:
        raise
    except BaseException as e:  # noqa: BLE001 - the point: nothing but PFError may escape
        pytest.fail(f"{case}: {type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _st_split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def mutate_bytes(data: bytes, rng: random.Random, region: int | None = None) -> bytes:
    """One of: truncate, flip a few bytes (in the first ``region`` bytes when given), splice junk."""
    b = bytearray(data)
    kind = rng.choice(["truncate", "flip", "flip", "junk", "length"])
    if kind == "truncate":
        return bytes(b[:rng.randrange(0, len(b))])
    if kind == "junk":
        at = rng.randrange(0, len(b))
        return bytes(b[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) + b[at:])
    if kind == "length":                       # the leading length / magic fields
        at = rng.randrange(0, min(24, len(b)))
        b[at] = rng.randrange(256)
        return bytes(b)
    top = min(len(b), region or len(b))
    for _ in range(rng.randrange(1, 8)):
        b[rng.randrange(0, top)] = rng.randrange(256)
    return bytes(b)


# Adapter banks ------------------------------------------------------------------------------------
CFG = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
                                 intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2))


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hostile_bank") / "bank.safetensors")
    AdapterBank.random(CFG, ["a", "b", "c"], rank=[2, 3, 4], modules={"a": ["q", "v"],
                       "b": ["up", "down"], "c": ["q", "o"]}, seed=1, router=True).save(path)
    AdapterBank.load(path, CFG)                # the unmutated file loads
    with open(path, "rb") as f:
        return path, f.read()


def test_mutated_bank_bytes(bank_file, tmp_path):
    _, data = bank_file
    header_len = 8 + struct.unpack("<Q", data[:8])[0]
    rng = random.Random(1234)
    seen = set()
    for i in range(60):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(mutate_bytes(data, rng, region=header_len))
        seen.add(outcome(f"bank bytes case {i}", lambda: AdapterBank.load(str(path), CFG)))
    assert "refused" in seen


META_KEYS = ["pf_bank_format", "expert_names", "ranks", "scalings", "modules", "target_modules",
             "fingerprint", "router", "lora_alpha", "use_rslora", "recipe"]


def _save_with_meta(path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=meta)


def test_bank_metadata_of_the_wrong_type(bank_file, tmp_path):
    from safetensors import safe_open
    src, _ = bank_file
    with safe_open(src, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    fp = json.loads(meta["fingerprint"])
    router = json.loads(meta["router"])
    cases = [(key, json.dumps(v)) for key in META_KEYS for v in WRONG]
    cases += [(key, "{not json") for key in META_KEYS]
    cases += [("fingerprint", json.dumps({**fp, field: v})) for field in fp for v in WRONG]
    cases += [("router", json.dumps({"sequence": {**router["sequence"], field: v}}))
              for field in router["sequence"] for v in WRONG]
    cases += [("router", json.dumps({"token": {**router["token"], "top_k": v}})) for v in WRONG]
    cases += [("ranks", json.dumps([2, 3, -4])), ("ranks", json.dumps([2, 3, 4.0])),
              ("scalings", json.dumps([1.0, "x", 2.0])), ("expert_names", json.dumps(["a", "a", "c"])),
              ("expert_names", json.dumps(["a", 2, "c"])), ("modules", json.dumps({"q": "a"})),
              ("modules", json.dumps({"q": [["a"]]})), ("lora_alpha", json.dumps([1, 2])),
              ("use_rslora", json.dumps(["yes", 1, None]))]
    seen = set()
    for i, (key, value) in enumerate(cases):
        path = tmp_path / f"meta{i}.safetensors"
        _save_with_meta(path, tensors, {**meta, key: value})
        for config in (CFG, None):
            seen.add(outcome(f"bank metadata {key}={value} (config {config is not None})",
                             lambda: AdapterBank.load(str(path), config)))
        path.unlink()
    assert "refused" in seen


# Models -------------------------------------------------------------------------------------------
CONFIG_FIELDS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
                 "hidden_act", "sliding_window", "torch_dtype"]


@pytest.fixture(scope="module")
def model_copy(tiny_chat_model, tmp_path_factory):
    src, _ = tiny_chat_model
    dst = tmp_path_factory.mktemp("hostile_model") / "m"
    shutil.copytree(src, dst)
    return str(dst)


def _load(folder):
    return Engine.from_pretrained(folder, device="cpu", dtype="fp32", progress=False)


def test_config_fields_of_the_wrong_type(model_copy):
    cfg_path = os.path.join(model_copy, "config.json")
    with open(cfg_path) as f:
        good = json.load(f)
    cases = [(field, v) for field in CONFIG_FIELDS for v in WRONG]
    cases += [("rope_scaling", {"rope_type": "llama3", "factor": "x"}),
              ("rope_scaling", {"rope_type": "llama3"}), ("rope_scaling", {"type": 5})]
    seen = set()
    t0 = time.perf_counter()
    try:
        for field, value in cases:
            with open(cfg_path, "w") as f:
                json.dump({**good, field: value}, f)
            seen.add(outcome(f"config.json {field}={value!r}", lambda: _load(model_copy)))
        for text in ("[]", "null", '"x"', "{", ""):
            with open(cfg_path, "w") as f:
                f.write(text)
            seen.add(outcome(f"config.json {text!r}", lambda: _load(model_copy)))
    finally:
        with open(cfg_path, "w") as f:
            json.dump(good, f)
    assert "refused" in seen and time.perf_counter() - t0 < 300


def test_mutated_safetensors_headers(model_copy, tmp_path):
    src = os.path.join(model_copy, "model.safetensors")
    with open(src, "rb") as f:
        data = f.read()
    header, body = _st_split(data)
    names = sorted(k for k in header if k != "__metadata__")
    rng = random.Random(99)
    cases = []
    for name in rng.sample(names, 4):
        entry = header[name]
        for field, values in (("dtype", ["F8", "X", 3, None, "I64"]),
                              ("shape", [[-1], ["a"], [10**12, 10**12], None, [], [0]]),
                              ("data_offsets", [[0, 10**15], [5, 2], "x", [0], [-8, 8], None])):
            cases += [(name, {**entry, field: v}) for v in values]
        cases.append((name, None))                         # the tensor is missing
    try:
        for i, (name, entry) in enumerate(cases):
            h = {k: v for k, v in header.items() if k != name}
            if entry is not None:
                h[name] = entry
            with open(src, "wb") as f:
                f.write(_st_join(h, body))
            outcome(f"safetensors header {name}={entry}", lambda: _load(model_copy))
        for i in range(20):
            with open(src, "wb") as f:
                f.write(mutate_bytes(data, rng, region=8 + struct.unpack("<Q", data[:8])[0]))
            outcome(f"safetensors bytes case {i}", lambda: _load(model_copy))
    finally:
        with open(src, "wb") as f:
            f.write(data)
    _load(model_copy)


def test_mutated_gguf_bytes(tmp_path):
    pytest.importorskip("gguf")
    from gguf_fixtures import write_tiny_gguf

    from pf_engine.model.gguf_import import convert_gguf
    good = tmp_path / "tiny.gguf"
    write_tiny_gguf(good)
    data = good.read_bytes()
    rng = random.Random(7)
    seen = set()
    for i in range(40):
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(mutate_bytes(data, rng, region=4096))
        out = tmp_path / f"out{i}"
        seen.add(outcome(f"gguf bytes case {i}", lambda: convert_gguf(path, out, progress=False)))
        shutil.rmtree(out, ignore_errors=True)
        path.unlink()
    assert "refused" in seen
