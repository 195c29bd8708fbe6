"""Speculative decoding by prompt lookup (issue 39; pf_engine/runtime/speculative.py): drafts
verified by one forward with each request's own persona gates give exactly the non-speculative
greedy tokens, for every persona kind, alone and in a batch beside requests that do not
speculate; the drafting itself; the one-line errors.  On the close-call model (nearly tied
logits: a rounding difference anywhere flips a token) in the two batch-invariant setups, the
4-bit weights and fp32 with deterministic=True."""
import pytest
import torch

from pf_engine import RequestError
from pf_engine.generation.sampling import SamplingParams
from pf_engine.runtime.config import SchedulerConfig
from pf_engine.runtime.scheduler import Scheduler
from pf_engine.runtime.speculative import accepted, propose
from test_invariance import EXPLICIT, close_call_model, tiny_engine  # noqa: F401  (a fixture)

KINDS = [None, EXPLICIT, "auto", "token"]


def repetitive_prompts(n: int = 4) -> list[list[int]]:
    """Random token runs said three times: the drafts have something to find."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, 256, (int(k),), generator=g).tolist() * 3
            for k in torch.randint(5, 12, (n,), generator=g)]


def run(eng, prompts, personas, spec, n=128):
    """Each request's greedy tokens (spec: its speculative_tokens), and the scheduler's stats."""
    sched = Scheduler(eng, SchedulerConfig(len(prompts), 512, 4096, background=False,
                                           decode="dynamic", prefix_cache=None))
    reqs = [sched.submit(p, SamplingParams(max_new_tokens=n, speculative_tokens=k), s)
            for p, s, k in zip(prompts, personas, spec)]
    sched.run()
    return [r.result().token_ids for r in reqs], sched.stats


@pytest.fixture(scope="module", params=[dict(quantize="q4"), dict(deterministic=True)],
                ids=["q4", "fp32-deterministic"])
def eng(close_call_model, request):  # noqa: F811
    e = tiny_engine(close_call_model, **request.param)
    assert e.batch_invariant
    return e


@pytest.mark.parametrize("kind", KINDS, ids=["base", "explicit", "auto", "token"])
def test_every_persona_kind_gives_the_plain_greedy_tokens(eng, kind):
    prompts = repetitive_prompts()
    plain, _ = run(eng, prompts, [kind] * 4, [0] * 4)
    spec, st = run(eng, prompts, [kind] * 4, [4] * 4)
    assert spec == plain
    assert st.draft_tokens > 0 and st.accepted_tokens > 0      # it did speculate, and hit


def test_a_batch_of_kinds_some_speculating(eng):
    prompts = repetitive_prompts(8)
    kinds, spec = KINDS * 2, [0, 3, 8, 16, 5, 0, 2, 7]
    want = [run(eng, [p], [k], [0])[0][0] for p, k in zip(prompts, kinds)]
    got, st = run(eng, prompts, kinds, spec)
    assert got == want and st.accepted_tokens > 0


def test_a_budget_and_eos_inside_the_accepted_drafts(eng):
    """The budget ends a request inside an accepted run: it stops at max_new_tokens exactly."""
    prompts = repetitive_prompts(3)
    for n in (1, 2, 5, 17):
        plain, _ = run(eng, prompts, [None] * 3, [0] * 3, n)
        spec, _ = run(eng, prompts, [None] * 3, [16] * 3, n)
        assert spec == plain and all(len(t) == n for t in spec)


def test_propose_takes_the_longest_latest_ngram():
    assert propose([1, 2, 3, 9, 9, 1, 2, 3], 2) == [9, 9]
    assert propose([1, 2, 3, 7, 5, 2, 3, 8, 4, 2, 3], 3) == [8, 4, 2]    # latest "2 3"
    assert propose([5, 1, 2, 6, 1, 2, 7, 3, 1, 2], 1) == [7]
    assert propose([4, 4, 4, 4], 8) == [4]                              # "4 4 4" at 0: then 4
    assert propose([1, 2, 3], 4) == [] and propose([7], 4) == []
    assert accepted([5, 6, 7], [5, 6, 9, 1]) == 2 and accepted([5], [4, 5]) == 0


def test_bad_values_are_one_line():
    for v in (-1, 17, 2.0, True):
        with pytest.raises(RequestError, match=r"^speculative_tokens=.*expected an integer in 0\.\.16"):
            SamplingParams(speculative_tokens=v)


def test_a_verify_step_fits_the_fused_decode_step():
    from pf_engine.backends.cpu.kernel import MAX_ROWS
    from pf_engine.runtime import speculative
    assert speculative.MAX_ROWS == MAX_ROWS


def test_drafting_adapts_its_length_and_backs_off():
    from pf_engine.runtime.speculative import Drafting
    d = Drafting(8)
    d.done(8, 8)
    assert (d.k, d.wait) == (8, 0)                      # all accepted: at most k_max
    d.done(8, 3)
    d.done(7, 1)
    assert (d.k, d.wait) == (6, 0)                      # misses shorten it, not below 1
    d.done(6, 6)
    assert d.k == 8
    d.done(8, 0)
    assert (d.misses, d.wait) == (1, 0)                 # one miss: no wait
    d.done(7, 0)
    assert (d.misses, d.wait) == (2, 4)
    d.done(6, 0)
    assert (d.misses, d.wait) == (3, 16)
    for _ in range(8):
        d.done(1, 0)
    assert d.wait == Drafting.MAX_WAIT and d.k == 1
    d.done(1, 1)
    assert (d.misses, d.wait, d.k) == (0, 0, 3)


def test_through_pf_serve_with_its_counters(close_call_model):  # noqa: F811
    """The body field through the openai client: the same completion, and /metrics counts the
    drafted and accepted tokens (parsed by prometheus_client)."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from prometheus_client.parser import text_string_to_metric_families
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    e = tiny_engine(close_call_model, quantize="q4")
    e.new_scheduler(slots=2, max_len=256)
    s = ThreadedServer(build_app(e, "tiny", timeout_s=60))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        prompt = repetitive_prompts(1)[0]
        kw = dict(model="tiny", prompt=prompt, max_tokens=48, temperature=0)
        plain = c.completions.create(**kw).choices[0].text
        assert c.completions.create(**kw, extra_body={"speculative_tokens": 6}).choices[0].text == plain
        with pytest.raises(openai.BadRequestError, match="speculative_tokens"):
            c.completions.create(**kw, extra_body={"speculative_tokens": 99})
        text = httpx.get(s.url + "/metrics", timeout=30).text
        got = {smp.name: smp.value for fam in text_string_to_metric_families(text)
               for smp in fam.samples}
        assert got["pf_speculative_draft_tokens_total"] >= got["pf_speculative_accepted_tokens_total"] > 0
    finally:
        s.close()


def test_sampling_keeps_the_distribution(eng):
    """Temperature 1 on the close-call model (nearly flat: a drafted token is rarely likely).  The
    statistic: how often a token (after the first) is the one prompt lookup would draft there.
    Without drafts that is the model's own probability of it (small); with drafts it must stay so
    (accepting every draft would make it nearly 1).  Over many seeds, within 4 standard errors.
    Batches of 6 (a verify step holds 16 rows)."""
    import math
    prompt, n = repetitive_prompts(1)[0], 16

    def hit_rate(k, base):
        hits = total = drafted = 0
        for s0 in range(0, 180, 6):
            outs = eng.generate([prompt] * 6, max_new_tokens=n, temperature=1.0, seed=base + s0,
                                speculative_tokens=k)
            drafted += eng.stats.draft_tokens
            for o in outs:
                seq = prompt + o.token_ids
                for i in range(len(prompt) + 1, len(seq)):
                    d = propose(seq[:i], 1)
                    if d:
                        total += 1
                        hits += seq[i] == d[0]
        return hits / total, total, drafted
    (p0, n0, _), (p1, n1, drafted) = hit_rate(0, 0), hit_rate(4, 10_000)
    assert drafted > 0 and n0 > 40 and n1 > 40
    p = (p0 * n0 + p1 * n1) / (n0 + n1)
    assert abs(p1 - p0) < 4 * math.sqrt(p * (1 - p) * (1 / n0 + 1 / n1)) + 0.02, (p0, p1)
