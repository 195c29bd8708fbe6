"""Structured output (pf_engine/generation/structured.py): every reply under a JSON schema parses and
validates with ``jsonschema``, streamed and not, on the bundled SmolLM2 (a real model, so the
replies are the ones a user gets); rows with and without a grammar share a batch and the free
ones are unchanged; bad formats and uncompilable schemas are one line.
"""
import json

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from pf_engine import Engine  # noqa: E402
from pf_engine.errors import RequestError  # noqa: E402
from pf_engine.generation.sampling import SamplingParams  # noqa: E402
from pf_engine.generation.structured import Grammars, check_response_format  # noqa: E402

NAME = {"type": "string", "maxLength": 24}
# Integers bounded: a 4-bit model can repeat a digit until the budget (it did, on an AVX-512
# machine, where torch's prefill GEMMs round differently), which no grammar stops otherwise.
COUNT = {"type": "integer", "minimum": 0, "maximum": 100000000}
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "calm"]}},
             "required": ["mood"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"tips": {"type": "array", "items": NAME, "minItems": 2,
                                                        "maxItems": 3}},
              "required": ["tips"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": NAME, "country": NAME},
                 "required": ["name", "country"], "additionalProperties": False},
        "population": COUNT}, "required": ["city", "population"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"title": NAME, "year": COUNT,
                                                  "rating": {"type": "number"}},
                 "required": ["title"], "additionalProperties": False},
}
PROMPTS = {
    "person": "Describe a fictional person as JSON with a name and an age.",
    "enum": "How does a sunny day make you feel? Answer as JSON.",
    "array": "Give me tips for a job interview as JSON.",
    "nested": "Describe the capital of France as JSON.",
    "optional": "Name a famous film as JSON.",
}


def fmt(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.fixture(scope="module")
def eng():
    e = Engine.from_pretrained(progress=False)
    e.set_prefix_cache(0)
    return e


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_replies_parse_and_validate(eng, name):
    out = eng.generate([PROMPTS[name]], max_new_tokens=96, chat=True, response_format=fmt(name))[0]
    value = json.loads(out.text)
    jsonschema.validate(value, SCHEMAS[name])
    assert out.finish_reason == "stop"
    streamed = "".join(eng.stream(PROMPTS[name], max_new_tokens=96, chat=True, response_format=fmt(name)))
    assert streamed == out.text


def test_json_object_mode(eng):
    out = eng.generate(["List two colours as JSON."], max_new_tokens=96, chat=True,
                       response_format={"type": "json_object"})[0]
    assert isinstance(json.loads(out.text), dict) and out.finish_reason == "stop"


@pytest.fixture(scope="module")
def eng32():
    """The bundled model in fp32: its greedy rows are batch-invariant (the 4-bit file's are not
    always: a row can change beside others), so a change in a free row would be the mask's."""
    e = Engine.from_pretrained(quantize="f32", progress=False)
    e.set_prefix_cache(0)
    return e


def test_mixed_batch_leaves_free_rows_unchanged(eng32):
    """Structured and free requests in one scheduler batch: the free rows equal their outputs
    alone; the structured rows validate."""
    eng = eng32
    free = ["Write a haiku about the sea.", "What is the capital of Italy?"]
    enc = [eng.tokenizer.encode(p, chat=True) for p in free + [PROMPTS["person"], PROMPTS["enum"]]]
    sched = eng.new_scheduler(slots=4, max_len=256, background=False)
    sched.prefix = None
    alone = []
    for ids in enc[:2]:
        r = sched.submit(ids, SamplingParams(max_new_tokens=24))
        sched.run()
        alone.append(r.result().token_ids)
    reqs = [sched.submit(enc[0], SamplingParams(max_new_tokens=24)),
            sched.submit(enc[2], SamplingParams(max_new_tokens=96,
                                                response_format=check_response_format(fmt("person")))),
            sched.submit(enc[1], SamplingParams(max_new_tokens=24)),
            sched.submit(enc[3], SamplingParams(max_new_tokens=96, response_format=check_response_format(fmt("enum"))))]
    sched.run()
    assert [reqs[0].result().token_ids, reqs[2].result().token_ids] == alone
    jsonschema.validate(json.loads(reqs[1].result().text), SCHEMAS["person"])
    jsonschema.validate(json.loads(reqs[3].result().text), SCHEMAS["enum"])


def test_the_mask_is_what_constrains(eng):
    """Without the grammar the same greedy request is not JSON of the schema (so the test above
    could fail): the mask, not the prompt, makes the replies valid."""
    out = eng.generate([PROMPTS["enum"]], max_new_tokens=40, chat=True)[0]
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(out.text), SCHEMAS["enum"])


@pytest.mark.parametrize("rf,words", [
    ("json", "expected an object with a type"),
    ({"type": "yaml"}, "response_format.type='yaml'"),
    ({"type": "json_schema"}, "expected an object with a name and a schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "schema must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "strict must be"),
])
def test_bad_response_formats_are_one_line(eng, rf, words):
    with pytest.raises(RequestError) as e:
        eng.generate(["hi"], max_new_tokens=2, response_format=rf)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def test_a_schema_the_library_cannot_compile_is_named(eng):
    rf = {"type": "json_schema", "json_schema": {"name": "broken", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}}}
    with pytest.raises(RequestError, match=r"response_format.json_schema 'broken' cannot be compiled: "):
        Grammars.of(eng).compile(check_response_format(rf))
    assert check_response_format({"type": "text"}) is None and check_response_format(None) is None
    torch.manual_seed(0)


def test_the_cpu_and_gpu_masking_paths_agree(eng):
    """mask_rows' numpy path (CPU) and its torch path (GPU; run here on CPU tensors) ban the
    same tokens, ids past the vocabulary included."""
    from pf_engine.generation.structured import mask_rows
    g = Grammars.of(eng).compile(check_response_format(fmt("person")))
    V = eng.config.vocab_size + 7
    a = torch.randn(3, V)
    b = a.clone()
    ms = [g.matcher(), g.matcher()]
    ms[1].consume(eng.tokenizer.fast.token_to_id("{"))
    mask_rows(a, [0, 2], ms, use_torch=False)
    ms = [g.matcher(), g.matcher()]
    ms[1].consume(eng.tokenizer.fast.token_to_id("{"))
    mask_rows(b, [0, 2], ms, use_torch=True)
    assert torch.equal(a, b) and torch.isfinite(a[1]).all()
    assert 0 < torch.isfinite(a[0]).sum() < eng.config.vocab_size and not torch.isfinite(a[2, -7:]).any()
