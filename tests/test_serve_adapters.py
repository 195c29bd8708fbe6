"""/v1/load_lora_adapter and /v1/unload_lora_adapter (issue 39; pf_engine/serve/adapters.py)
through the real openai client: an expert replaced while 16 requests stream (none fails or
changes: each equals the old bank's output; the next request gets the new expert, equal to an
engine built with it), the model ids following, bad bodies and files one 400 naming the field,
the API key guarding them."""
import threading

import pytest

from pf_engine import Engine
from pf_engine.model.config import ModelConfig
from pf_engine.persona import bank_edit
from pf_engine.persona.bank import AdapterBank
from pf_engine.serve import build_app
from pf_engine.serve.threaded import ThreadedServer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
PROMPTS = [f"Story {i}: the sea and the sky" for i in range(16)]


def offline(folder, bank, persona, prompt, n=24):
    e = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", quantize="q4")
    return e.generate(prompt, max_new_tokens=n, persona=persona, chat=False)[0].text


@pytest.fixture
def setup(tiny_chat_model, tmp_path):
    folder = tiny_chat_model[0]
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    one = AdapterBank.random(cfg, ["a", "b"], rank=4, seed=5, router="sequence")
    two = AdapterBank.random(cfg, ["a", "b"], rank=4, seed=6)
    two.save(tmp_path / "two.pfbank")
    eng = Engine.from_pretrained(folder, adapters=one, progress=False, device="cpu", quantize="q4")
    eng.new_scheduler(slots=4, max_len=128)
    return folder, one, two, eng, tmp_path


def serve(eng, **kw):
    s = ThreadedServer(build_app(eng, "tiny", max_queue=64, timeout_s=120, **kw))
    return s, openai.OpenAI(base_url=s.url + "/v1", api_key=kw.get("api_key") or "none",
                            max_retries=0, timeout=120)


def test_an_expert_replaced_while_16_requests_stream(setup):
    folder, one, two, eng, tmp = setup
    want_old = [offline(folder, one, {"a": 1.0}, p) for p in PROMPTS]
    mixed = bank_edit.with_expert(one, bank_edit.split(two)[0])
    s, c = serve(eng)
    got, errors, started = [None] * 16, [], threading.Barrier(17)

    def stream(i):
        try:
            parts = []
            it = c.completions.create(model="tiny:a", prompt=PROMPTS[i], max_tokens=24,
                                      temperature=0, stream=True)
            started.wait()
            for ch in it:
                parts.append(ch.choices[0].text)
            got[i] = "".join(parts)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            started.abort()
    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        started.wait()                              # every stream has its first chunk
        r = httpx.post(s.url + "/v1/load_lora_adapter", timeout=120,
                       json={"lora_name": "a", "lora_path": str(tmp / "two.pfbank")})
        for t in threads:
            t.join()
        assert r.status_code == 200, r.text
        assert errors == [] and got == want_old      # in flight: the old expert, to the end
        assert r.json()["experts"] == ["a", "b"] and "tiny:auto" in r.json()["models"]
        new = c.completions.create(model="tiny:a", prompt=PROMPTS[0], max_tokens=24,
                                   temperature=0).choices[0].text
        assert new == offline(folder, mixed, {"a": 1.0}, PROMPTS[0]) != want_old[0]
    finally:
        s.close()


def test_model_ids_follow_and_bad_input_is_one_400(setup):
    folder, one, two, eng, tmp = setup
    s, c = serve(eng)
    try:
        def post(path, body):
            return httpx.post(s.url + path, json=body, timeout=60)
        r = post("/v1/unload_lora_adapter", {"lora_name": "b"})
        assert r.status_code == 200 and r.json()["models"] == ["tiny", "tiny:a"]   # router gone
        assert [m.id for m in c.models.list()] == ["tiny", "tiny:a"]
        with pytest.raises(openai.BadRequestError, match="unknown model 'tiny:b'"):
            c.completions.create(model="tiny:b", prompt="Hi", max_tokens=2)
        for path, body, param in (
                ("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp / "none")}, "lora_path"),
                ("/v1/load_lora_adapter", {"lora_name": "c"}, "lora_path"),
                ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": "x"}, "lora_name"),
                ("/v1/unload_lora_adapter", {"lora_name": "zz"}, "lora_name"),
                ("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "x", "bank": 1}, "bank")):
            r = post(path, body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and "\n" not in err["message"], r.text
        assert eng.bank.expert_names == ["a"]
        r = post("/v1/load_lora_adapter", {"lora_name": "two", "lora_path": str(tmp / "two.pfbank"),
                                           "bank": True})
        assert r.status_code == 200 and r.json()["experts"] == ["a", "b"]
        r = post("/v1/unload_lora_adapter", {"lora_name": "two", "bank": True})
        assert r.status_code == 200 and r.json()["models"] == ["tiny"] and eng.bank is None
    finally:
        s.close()


def test_the_api_key_guards_them(setup):
    *_, eng, tmp = setup
    s, _ = serve(eng, api_key="k")
    try:
        r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30)
        assert r.status_code == 401 and eng.bank.expert_names == ["a", "b"]
        r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30,
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and eng.bank.expert_names == ["b"]
    finally:
        s.close()


def test_replicas_refuse_run_time_changes_in_one_line():
    import asyncio
    ray_serve = pytest.importorskip("pf_engine.serve.ray_serve")
    from pf_engine.serve.protocol import APIError
    with pytest.raises(APIError, match="not supported with --replicas") as e:
        asyncio.run(ray_serve.RemoteServer(None, 1).change_bank({"lora_name": "a"}, False))
    assert e.value.status == 501
