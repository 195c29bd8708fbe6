"""pf-eval's usefulness measures on fixtures with known answers (train/metrics.py, train/usefulness.py,
train/distill.py), and the independent sentence encoder where its package is installed."""
import math
from types import SimpleNamespace

import pytest

from pf_engine.train import usefulness
from pf_engine.train.distill import base_replies
from pf_engine.train.metrics import fact_correct, substance


def test_substance_counts_words_and_items():
    assert substance("") == {"words": 0, "items": 0}
    listed = "Try these:\n1. Go for a hike.\n2) Bake bread\n- Visit a museum\n* Call a friend"
    assert substance(listed)["items"] == 4
    prose = "You could walk by the river. Or read a good book at home! Why not cook a stew?"
    assert substance(prose) == {"words": 18, "items": 3}
    assert substance("Yes. No. Ok fine then, sure.")["items"] == 1        # short bits are not items


@pytest.mark.parametrize("reply,answers,want", [
    ("The capital of France is Paris.", ["paris"], True),
    ("PARIS!", ["paris"], True),
    ("It fell in 1989.", ["8", "eight"], False),          # a digit inside a number is not it
    ("A spider has 8 legs.", ["8", "eight"], True),
    ("Spiders have eight legs", ["8", "eight"], True),
    ("weighty matters", ["eight"], False),               # a word inside a word is not it
    ("17 x 23 = 391", ["391"], True),
    ("about 3910", ["391"], False),
    ("Water freezes at 32 °F.", ["32"], True),
    ("The symbol is H2O.", ["h2o"], True),
])
def test_fact_correct(reply, answers, want):
    assert fact_correct(reply, answers) is want


class FakeEncoder:
    """relevance = share of the message's words found in the reply (known by construction)."""

    def relevance(self, messages, replies):
        out = []
        for m, r in zip(messages, replies):
            mw, rw = set(m.lower().split()), set(r.lower().split())
            out.append(len(mw & rw) / len(mw) if mw else 0.0)
        return out


class FakeClassifier:
    """P(T+) = 0.9 if the text says "kind", else 0.2."""

    def prob(self, texts):
        return [0.9 if "kind" in t else 0.2 for t in texts]


def _corpus():
    heldout = SimpleNamespace(
        messages={"m1": "ideas for my weekend", "m2": "my dog died"},
        open={"m1"},
        situations=[
            {"id": "s1", "category": "distress", "text": "my dog died today",
             "target": {"agreeableness+": 0.6, "neuroticism-": 0.4}},
            {"id": "s2", "category": "complaint", "text": "the shop was rude",
             "target": {"agreeableness-": 1.0}},
            {"id": "s3", "category": "factual", "text": "capital of france",
             "target": {"none": 1.0}}],
        facts=[{"id": "f1", "question": "What is 2 plus 3?", "answers": ["5", "five"]},
               {"id": "f2", "question": "Capital of Italy?", "answers": ["rome"]}],
        neutral=[("How do I boil an egg?", "Boil it.")])
    return SimpleNamespace(heldout=heldout)


def test_reply_measures_known_values():
    c = _corpus()
    greedy = {"base": ["ideas : walk . read . cook . swim", "sorry about your dog"],
              "auto": ["ideas : walk", "no no no no no no no no no"]}
    sampled = {"base": ["fine ideas here for you", "so sorry"], "auto": ["ok", "my dog"]}
    r = usefulness.reply_measures(c, ["m1", "m2"], greedy, sampled, FakeEncoder())
    assert r["base"]["relevance"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert r["base"]["words"] == 5 and r["auto"]["words"] == 2            # open request m1 only
    assert r["auto"]["words_vs_base"] == pytest.approx(2 / 5)
    assert r["auto"]["degenerate_greedy"] == 2                          # too short; a loop
    assert r["base"]["degenerate_greedy"] == 0
    assert r["base"]["degenerate_sampled"] == 1 and r["auto"]["degenerate_sampled"] == 2


def test_fact_and_situation_measures_known_values():
    c = _corpus()
    f = usefulness.fact_measures(c.heldout.facts, {"base": ["It is 5.", "Paris"],
                                                      "auto": ["five", "Rome!"]})
    assert f == {"base": {"correct": 1, "n": 2}, "auto": {"correct": 2, "n": 2}}
    sits = c.heldout.situations[:2]
    replies = {"auto": ["so kind of you, my dog died today", "the shop was rude"],
               "base": ["my dog died", "the shop was kind"]}
    s = usefulness.situation_measures(sits, replies, FakeEncoder(), {
        "agreeableness": FakeClassifier()})
    # s1: leading pole agreeableness+, auto says "kind" -> moved; s2: agreeableness-, base says
    # "kind" (so base is more agreeable) -> auto moved towards - as well
    assert s["moved"] == 2 and s["moved_share"] == 1.0
    assert [e["pole"] for e in s["each"]] == ["agreeableness+", "agreeableness-"]
    assert s["relevance_auto"] == pytest.approx(1.0)
    replies["auto"][0] = "my dog died"
    assert usefulness.situation_measures(sits, replies, FakeEncoder(), {
        "agreeableness": FakeClassifier()})["moved"] == 1


def test_situation_measures_score_the_leading_poles_expert_and_prompt_against_base():
    c = _corpus()
    sits = c.heldout.situations[:2]
    replies = {"auto": ["my dog died", "the shop was rude"],
               "base": ["my dog died", "the shop was kind"],
               "expert": ["so kind", "kind kind"], "prompt": ["so kind", "rude"]}
    s = usefulness.situation_measures(sits, replies, FakeEncoder(), {
        "agreeableness": FakeClassifier()})
    # auto: s2 only (base "kind", target agreeableness-); expert: s1 only; prompt: both
    assert s["moved"] == 1
    assert {k: v["moved"] for k, v in s["lead"].items()} == {"expert": 1, "prompt": 2}
    assert s["lead"]["prompt"]["moved_share"] == 1.0
    assert s["each"][0]["p_expert"] == pytest.approx(0.9)
    assert s["each"][1]["p_expert"] == pytest.approx(0.1)           # 1 - P(+) for a - pole
    del replies["expert"], replies["prompt"]
    assert "lead" not in usefulness.situation_measures(sits, replies, FakeEncoder(), {
        "agreeableness": FakeClassifier()})


class EchoEngine:
    """generate() replies with the persona and the prompt, so a reply shows where it came from;
    a batch of at most B prompts at a time."""

    def generate(self, prompts, max_new_tokens, persona=None, **kw):
        return [SimpleNamespace(text=f"{p}|{q}") for p, q in zip(persona, prompts)]


class EchoEncoder:
    def prompt(self, text, system=None):
        return f"[{system}] {text}" if system else text


def test_situation_replies_run_each_situations_leading_pole_conditions():
    c = _corpus()
    poles = ["agreeableness+", "agreeableness-", "neuroticism-"]
    conds = [{"name": "base", "persona": None, "system": None},
             {"name": "auto", "persona": "auto", "system": None}]
    conds += [{"name": f"expert:{p}", "persona": p, "system": None} for p in poles]
    conds += [{"name": f"prompt:{p}", "persona": None, "system": f"be {p}"} for p in poles]
    persona_sits, none_sits = c.heldout.situations[:2], c.heldout.situations[2:]
    reps, by_id = usefulness.situation_replies(EchoEngine(), EchoEncoder(), conds,
                                               persona_sits, none_sits, 32)
    assert reps["base"] == ["None|my dog died today", "None|the shop was rude"]
    assert reps["auto"] == ["auto|my dog died today", "auto|the shop was rude"]
    assert reps["expert"] == ["agreeableness+|my dog died today",
                              "agreeableness-|the shop was rude"]
    assert reps["prompt"] == ["None|[be agreeableness+] my dog died today",
                              "None|[be agreeableness-] the shop was rude"]
    assert by_id["base"]["s3"] == "None|capital of france"
    assert sorted(by_id) == ["auto", "base", "lead:expert", "lead:prompt"]
    assert by_id["lead:expert"] == {"s1": reps["expert"][0], "s2": reps["expert"][1]}
    # without the prompted conditions only the experts are run
    reps, by_id = usefulness.situation_replies(EchoEngine(), EchoEncoder(), conds[:5],
                                               persona_sits, none_sits, 32)
    assert sorted(reps) == ["auto", "base", "expert"]


def test_run_jobs_keeps_the_order_of_its_jobs_across_batches():
    conds = [{"name": "a", "persona": "x", "system": None},
             {"name": "b", "persona": "y", "system": "s"}]
    jobs = [(conds[i % 2], "w" * (7 - i)) for i in range(7)]
    out = usefulness.run_jobs(EchoEngine(), EchoEncoder(), jobs, 8, B=2)
    assert out == [f"{c['persona']}|{EchoEncoder().prompt(t, c['system'])}" for c, t in jobs]


class FakeEngine:
    """generate() gives every prompt a strength read from a table (the router's "none")."""

    def __init__(self, strength):
        self.strength, self.calls = strength, []

    def generate(self, texts, max_new_tokens, persona=None, chat=False, **kw):
        self.calls.append((tuple(texts), persona))
        return [SimpleNamespace(text="x y z", gates={"kind": "sequence", "weights": {},
                                                     "strength": self.strength(t)})
                for t in texts]


def test_strength_measures_count_prompts_with_little_persona_weight():
    c = _corpus()
    eng = FakeEngine(lambda t: 0.05 if "capital" in t.lower() else 0.6)
    st = usefulness.strength_measures(eng, c, limit=0)
    assert st["no-persona situations"] == {"n": 1, "low": 1, "mean": 0.05}
    assert st["fact questions"]["low"] == 1 and st["fact questions"]["n"] == 2
    assert st["neutral prompts"]["low"] == 0
    assert st["all"]["n"] == 4 and st["all"]["low"] == 2 and st["all"]["low_share"] == 0.5
    assert all(p == "auto" for _, p in eng.calls)


def test_base_replies_are_filtered_by_fluency_relevance_and_facts():
    split = SimpleNamespace(messages={"m1": "ideas for my weekend"}, situations=[
        {"id": "s1", "text": "my dog died today", "target": {}}],
        neutral=[("how to boil an egg", "x")],
        facts=[{"question": "what is 2 plus 3", "answers": ["5"]},
               {"question": "capital of italy", "answers": ["rome"]}])
    answers = {"ideas for my weekend": "weekend ideas : a walk",
               "my dog died today": "no no no no no no no no no no",
               "how to boil an egg": "the stock market rose",
               "what is 2 plus 3": "2 plus 3 is 5",
               "capital of italy": "the capital of italy is milan"}

    class Eng:
        def generate(self, texts, chat, **kw):
            assert chat and kw["temperature"] == 0
            return [SimpleNamespace(text=answers[t]) for t in texts]
    got = base_replies(Eng(), split, FakeEncoder())
    assert got.pairs == [("ideas for my weekend", "weekend ideas : a walk"),
                         ("what is 2 plus 3", "2 plus 3 is 5")]
    assert got.report["dropped"] == {"degenerate": 1, "irrelevant": 1, "wrong_fact": 1}
    assert got.report["generated"] == 5 and got.report["kept"] == 2


def test_sentence_encoder_ranks_the_relevant_reply_first():
    from pf_engine.errors import PFError
    from pf_engine.train.encoder import SentenceEncoder
    try:
        e = SentenceEncoder()
    except PFError as err:
        pytest.skip(str(err))
    msgs = ["My dog died this morning and I can't stop crying.", "What is the capital of France?"]
    good = e.relevance(msgs, ["I'm so sorry about your dog; losing a pet hurts so much.",
                              "The capital of France is Paris."])
    bad = e.relevance(msgs, ["That's a very kind kind thing to say.",
                             "Let's get the creative spark going!"])
    assert all(g > b + 0.2 for g, b in zip(good, bad))
    v = e.encode(["hello world", "a"])
    assert v.shape == (2, 384) and all(math.isclose(float(n), 1.0, rel_tol=1e-5)
                                       for n in v.norm(dim=-1))
    assert e.relevance(["x"], [""]) == [0.0]
