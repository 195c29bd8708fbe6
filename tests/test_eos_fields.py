"""The fields benchmark clients send (issue 39): ``ignore_eos`` (EOS does not end a request: it
is kept and decoding goes on to max_tokens) and ``min_tokens`` (EOS is masked until that many
new tokens), as vLLM takes them, in SamplingParams, generate and pf-serve (the real openai
client).  The tiny chat model's EOS is set to its first greedy token, so a plain request stops
at once."""
import pytest

from pf_engine import Engine, RequestError
from pf_engine.generation.sampling import SamplingParams

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def eng(tiny_chat_model):
    e = Engine.from_pretrained(tiny_chat_model[0], progress=False, device="cpu", dtype="fp32")
    first = e.generate(["Hello there"], max_new_tokens=1)[0].token_ids[0]
    e.eos_ids = [first]                   # its first greedy token now ends a request
    e.new_scheduler(slots=4, max_len=128)
    return e


def test_eos_stops_ignore_eos_goes_on_min_tokens_masks_it(eng):
    plain = eng.generate(["Hello there"], max_new_tokens=8)[0]
    assert plain.finish_reason == "stop" and len(plain.token_ids) == 1
    ign = eng.generate(["Hello there"], max_new_tokens=8, ignore_eos=True)[0]
    assert ign.finish_reason == "length" and len(ign.token_ids) == 8
    assert ign.token_ids[0] == plain.token_ids[0]                  # EOS kept, then more
    mt = eng.generate(["Hello there"], max_new_tokens=8, min_tokens=5)[0]
    assert len(mt.token_ids) >= 5 and eng.eos_ids[0] not in mt.token_ids[:5]


@pytest.mark.parametrize("kw, words", [
    (dict(min_tokens=9, max_new_tokens=8), "min_tokens=9: expected an integer in 0..max_new"),
    (dict(min_tokens=-1), "min_tokens=-1"), (dict(ignore_eos="yes"), "ignore_eos='yes'")])
def test_bad_values_are_one_line(kw, words):
    with pytest.raises(RequestError, match=words):
        SamplingParams(**kw)


def test_through_the_openai_client(eng):
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    s = ThreadedServer(build_app(eng, "tiny", timeout_s=60))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
        r = c.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                 extra_body={"min_tokens": 4})
        assert r.usage.completion_tokens >= 4
        r = c.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0)
        assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
        for body, param in (({"min_tokens": 7}, "min_tokens"), ({"ignore_eos": 1}, "ignore_eos")):
            with pytest.raises(openai.BadRequestError, match=param):
                c.completions.create(model="tiny", prompt="Hi", max_tokens=6, extra_body=body)
    finally:
        s.close()
