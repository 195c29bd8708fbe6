"""Per-persona metrics on /metrics (issue 39; pf_engine/serve/metrics.py): by the model id a
request named (requests, tokens, latency) and by expert (choices, gate mass, tokens), and the bank
loaded, parsed with prometheus_client's own parser after requests through the openai client."""
import pytest

from conftest import bank_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    with bank_server(tiny_chat_model[0], seed=3) as served:
        yield served


def scrape(url) -> dict:
    """{(name, sorted label items): value} of every sample."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in parser.text_string_to_metric_families(text) for smp in fam.samples}


def value(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_tokens_and_gate_mass_by_model_and_expert(served):
    s, c, bank = served
    e0, e1, e2 = bank.expert_names[:3]
    before = scrape(s.url)
    one = c.completions.create(model=f"tiny:{e0}", prompt="Hi there", max_tokens=5, temperature=0)
    mix = c.completions.create(model="tiny", prompt="Hi there", max_tokens=4, temperature=0,
                               extra_body={"persona": {e1: 0.7, e2: 0.3}})
    c.completions.create(model="tiny", prompt="Hi there", max_tokens=3, temperature=0)
    auto = c.completions.create(model="tiny:auto", prompt="Hi there", max_tokens=3, temperature=0)
    m = scrape(s.url)

    def delta(name, **labels):
        return value(m, name, **labels) - value(before, name, **labels)

    assert delta("pf_model_requests_total", model=f"tiny:{e0}", status="ok") == 1
    assert delta("pf_model_requests_total", model="tiny", status="ok") == 2
    assert delta("pf_model_generated_tokens_total", model=f"tiny:{e0}") == one.usage.completion_tokens
    assert delta("pf_model_time_to_first_token_seconds_count", model="tiny:auto") == 1
    assert delta("pf_model_request_seconds_count", model="tiny") == 2
    # explicit weights: their mass; auto: its gates; the base request: none
    gates = {n: 0.0 for n in bank.expert_names}
    gates[e0] += 1.0
    gates[e1] += 0.7
    gates[e2] += 0.3
    assert auto.choices[0].text is not None
    got = {n: delta("pf_expert_gate_mass_total", bank="default", expert=n) for n in bank.expert_names}
    routed = {n: got[n] - gates[n] for n in bank.expert_names}
    assert sum(routed.values()) == pytest.approx(1.0, abs=1e-5)      # the router's row sums to 1
    assert all(v >= -1e-6 for v in routed.values())
    assert delta("pf_expert_requests_total", bank="default", expert=e0) >= 1
    assert delta("pf_expert_generated_tokens_total", bank="default", expert=e1) >= mix.usage.completion_tokens


def test_the_loaded_bank_is_reported(served):
    s, _, bank = served
    m = scrape(s.url)
    assert value(m, "pf_bank_bytes", bank="default") == bank.nbytes
    assert value(m, "pf_bank_experts", bank="default") == bank.num_experts
