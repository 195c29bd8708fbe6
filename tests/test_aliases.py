"""Other servers' mixture fields (issue 39; pf_engine/serve/aliases.py): llama.cpp server's
``lora`` list and LoRAX's ``merged_adapters`` give the same tokens as the persona weights they
stand for, through the real openai client; GET /lora-adapters lists the ids; bad values are one
400 naming the field."""
import pytest

from conftest import bank_server
from pf_engine.serve import aliases

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    with bank_server(tiny_chat_model[0], seed=11) as (s, c, bank):
        yield s, c, list(bank.expert_names)


def _tokens(c, **extra):
    r = c.completions.create(model="tiny", prompt="Tell me a story", max_tokens=8, temperature=0,
                             extra_body=extra)
    return r.choices[0].text


def test_lora_and_merged_adapters_equal_the_persona_weights(served):
    _, c, names = served
    want = _tokens(c, persona={names[0]: 0.7, names[2]: 0.3})
    assert want != _tokens(c)                                      # the experts change the reply
    assert _tokens(c, lora=[{"id": 0, "scale": 0.7}, {"id": 2, "scale": 0.3}]) == want
    assert _tokens(c, merged_adapters={"ids": [names[0], names[2]], "weights": [0.7, 0.3],
                                       "merge_strategy": "linear"}) == want
    # llama.cpp: an id left out gets 0; all zero (or none listed) is the base model
    assert _tokens(c, lora=[{"id": 0, "scale": 0.7}, {"id": 1, "scale": 0.0},
                            {"id": 2, "scale": 0.3}]) == want
    assert _tokens(c, lora=[]) == _tokens(c)


def test_lora_adapters_lists_the_ids(served):
    s, _, names = served
    listing = httpx.get(s.url + "/lora-adapters", timeout=30).json()
    assert listing == [{"id": i, "path": n, "scale": 0.0} for i, n in enumerate(names)]


@pytest.mark.parametrize("extra, field, words", [
    ({"lora": [{"id": 99, "scale": 1}]}, "lora", "id 99: expected an integer 0.."),
    ({"lora": [{"id": 0, "scale": -1}]}, "lora", "weight >= 0"),
    ({"lora": [{"id": 0}]}, "lora", "expected {\"id\": int"),
    ({"lora": {"id": 0}}, "lora", "expected a list"),
    ({"merged_adapters": {"ids": ["nope"], "weights": [1]}}, "merged_adapters", "unknown expert"),
    ({"merged_adapters": {"ids": ["x"], "weights": []}}, "merged_adapters", "weights: expected a list of 1"),
    ({"merged_adapters": {"ids": ["x"], "weights": [1], "merge_strategy": "ties"}},
     "merged_adapters", "only 'linear'"),
    ({"lora": [], "merged_adapters": {}}, "merged_adapters", "not both"),
    ({"lora": [{"id": 0, "scale": 1}], "persona": "auto"}, "lora", "already selects a persona"),
])
def test_bad_alias_fields_are_one_400_naming_them(served, extra, field, words):
    _, c, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body=extra)
    err = e.value.body
    assert err["param"] == field and words in err["message"] and "\n" not in err["message"]


def test_an_id_that_selects_a_persona_refuses_the_alias(served):
    _, c, names = served
    with pytest.raises(openai.BadRequestError, match="already selects a persona"):
        c.completions.create(model=f"tiny:{names[0]}", prompt="Hi", max_tokens=2,
                             extra_body={"lora": [{"id": 1, "scale": 1.0}]})


def test_no_bank_no_alias():
    with pytest.raises(aliases.AliasError, match="no adapter bank"):
        aliases.persona({"lora": [{"id": 0, "scale": 1}]}, [])
    assert aliases.persona({"model": "x"}, ["a"]) is None
