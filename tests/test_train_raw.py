"""The KL term on raw text (train/raw.py): the experts keep the base model's plain completions."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pf_engine.train.experts import Item, Pools, Trunk, load_hf_model, train_expert
from pf_engine.train.raw import (ARITH_QUESTIONS, ARITH_TAG, FORMATS, RAW_TOKENS, arith_prompts,
                                 evaluated_questions, raw_prompts)
from pf_engine.train.recipe import Recipe
from pf_engine.train.sequences import Sequence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "personas")


def test_raw_prompts_cycle_formats_and_leave_out_evaluated_questions():
    """A corpus question that pf-eval's reasoning tasks ask gets no raw continuation (the
    shipped corpus asks none: test_retention holds that; a user's --data corpus may)."""
    from pf_engine.train.data import load_corpus
    split = load_corpus(DATA, splits=("train",)).train
    asked = evaluated_questions()
    assert len(asked) > 150
    clash = sorted(asked)[:2]
    split.facts = split.facts + [{"question": q.capitalize(), "answers": ["x"]} for q in clash]
    questions = [q for q, _ in split.neutral] + [f["question"] for f in split.facts]
    got = raw_prompts(split)
    assert len(got) == len(questions) - 2
    assert not any(q in p.lower() for q in clash for p in got)
    kept = questions[:-2]
    assert got == [FORMATS[i % 3].format(q=q) for i, q in enumerate(kept)]
    assert len(raw_prompts(split, exclude=set())) == len(questions)
    assert len(raw_prompts(split, limit=5)) == 5


def test_raw_sequences_are_the_base_models_greedy_continuations(tiny_chat_model):
    from pf_engine import Engine
    from pf_engine.train.raw import raw_sequences
    eng = Engine.from_pretrained(tiny_chat_model[0], progress=False, device="cpu", dtype="fp32")
    split = SimpleNamespace(neutral=[("How do I boil an egg?", "x"), ("Name a tree.", "y")],
                            facts=[{"question": "What is 3 plus 4?", "answers": ["7"]}])
    prompts = raw_prompts(split)
    seqs = raw_sequences(eng, prompts)
    want = eng.generate(prompts, max_new_tokens=RAW_TOKENS, temperature=0.0)
    assert [s.prompt for s in seqs] == [eng.tokenizer.encode(p) for p in prompts]
    assert [s.reply for s in seqs] == [w.token_ids for w in want]
    assert all(0 < len(s.reply) <= RAW_TOKENS for s in seqs)


def _expert(folder):
    from peft import LoraConfig, get_peft_model
    hf = load_hf_model(folder)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                       target_modules=["q_proj", "v_proj", "down_proj"],
                                       layers_to_transform=[1]))
    return pm, Trunk(hf, 1)


def _question(prompt: str) -> str:
    for f in FORMATS:
        head, tail = f.split("{q}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return prompt[len(head):len(prompt) - len(tail)]
    raise AssertionError(prompt)


def test_arith_prompts_are_distinct_and_ask_no_evaluated_question():
    """48 distinct questions of six kinds, every kind in every format, none that pf-eval's
    arithmetic asks (its own seed and words: not one is even excluded), and ``exclude`` holds."""
    got = arith_prompts()
    qs = [_question(p) for p in got]
    assert len(got) == ARITH_QUESTIONS == len(set(qs))
    assert not {q.lower() for q in qs} & evaluated_questions()
    fmts = [0 if p.startswith("Question: ") else 1 if p.startswith("Q: ") else 2 for p in got]
    assert {(i % 6, f) for i, f in enumerate(fmts)} == {(k, f) for k in range(6) for f in range(3)}
    assert fmts.count(0) == ARITH_QUESTIONS // 3
    assert got == arith_prompts()
    assert arith_prompts(limit=5) == got[:5]
    dropped = arith_prompts(exclude={qs[0].lower()})
    assert qs[0] not in [_question(p) for p in dropped] and len(dropped) == ARITH_QUESTIONS


def test_kl_items_draw_arithmetic_from_its_own_pool():
    import random

    from pf_engine.train.experts import kl_items
    text = [Item(Sequence([1], [2], f"raw:{i}")) for i in range(20)]
    arith = [Item(Sequence([1], [2], f"{ARITH_TAG}:{i}")) for i in range(20)]
    distill = [Item(Sequence([1], [2], f"distill:{i}")) for i in range(5)]
    rc = Recipe(distill=2, raw=2, arith=1)
    for seed in range(20):
        got = kl_items(random.Random(seed), distill, text + arith, rc)
        tags = [it.seq.tag.split(":")[0] for it in got]
        assert tags == ["distill", "distill", "raw", "raw", ARITH_TAG]
    off = Recipe(distill=2, raw=2, arith=0)   # off: the draws of the recipe before arith
    a = kl_items(random.Random(3), distill, text, off)
    rng = random.Random(3)
    assert a == rng.sample(distill, 2) + rng.sample(text, 2)


def _raw_kl_after_training(folder, raw_per_step: int, arith_per_step: int = 0,
                           tag: str = "raw", kl_first: float = 0.0, at_first: bool = False
                           ) -> float:
    """Train an expert on chat-like texts that all end with one token; return its KL to the base
    on raw continuations tagged ``tag`` (seen by the term when raw_per_step > 0, or, tagged as
    arithmetic, when arith_per_step > 0): the mean over their tokens, or with ``at_first`` the
    mean at their first token (``kl_first``: that token's extra weight in training)."""
    pm, trunk = _expert(folder)
    rng = np.random.default_rng(4)
    end = 2
    own = [Item(Sequence(rng.integers(3, 200, 6).tolist(), rng.integers(3, 200, 4).tolist() + [end]))
           for _ in range(6)]
    raw = [Item(Sequence(rng.integers(3, 200, 7).tolist(), rng.integers(3, 200, 5).tolist(), tag))
           for _ in range(4)]
    trunk.cache(own + raw)
    trunk.cache_base_top(raw)                     # the adapter starts as the identity (B = 0)
    params = [p for p in pm.parameters() if p.requires_grad]
    rc = Recipe(steps=12, lr=2e-2, pairs=3, retain=0, distill=0, raw=raw_per_step,
                arith=arith_per_step, w_pair=0.0, w_kl=4.0, kl_first=kl_first)
    train_expert(trunk, params, Pools(own, own, [], [], raw), rc, seed=0)
    with torch.no_grad():
        mean = float(trunk.kl_to_base(raw))
        return float(trunk.kl_to_base(raw, first=1.0)) - mean if at_first else mean


def test_raw_kl_term_holds_plain_completions(tiny_chat_model):
    """Without the raw items the expert drifts on plain text; with them it stays near the base."""
    free = _raw_kl_after_training(tiny_chat_model[0], 0)
    held = _raw_kl_after_training(tiny_chat_model[0], 2)
    assert free > 0.01
    assert held < 0.3 * free, (held, free)


def test_arith_kl_term_holds_arithmetic_completions(tiny_chat_model):
    """The arithmetic items are held by ``arith`` per step, apart from ``raw``."""
    free = _raw_kl_after_training(tiny_chat_model[0], 2, 0, tag=ARITH_TAG)
    held = _raw_kl_after_training(tiny_chat_model[0], 0, 2, tag=ARITH_TAG)
    assert free > 0.01
    assert held < 0.3 * free, (held, free)


def test_kl_first_holds_the_first_continuation_token(tiny_chat_model):
    """``kl_first`` weighs the first token of each raw continuation (where an empty answer
    starts) on top of the mean: there the expert stays nearer the base."""
    free = _raw_kl_after_training(tiny_chat_model[0], 2, at_first=True)
    held = _raw_kl_after_training(tiny_chat_model[0], 2, kl_first=8.0, at_first=True)
    assert free > 0.005
    assert held < 0.5 * free, (held, free)


def test_kl_first_weighs_only_plain_continuations():
    """Chat replies (the distilled ones) get no extra weight: a persona's first word is its
    own; raw and arithmetic continuations do."""
    from pf_engine.train.raw import is_plain
    assert is_plain(Sequence([1], [2], "raw:3")) and is_plain(Sequence([1], [2], f"{ARITH_TAG}:0"))
    assert not is_plain(Sequence([1], [2], "distill:0"))
    assert not is_plain(Sequence([1], [2], "reply:openness+:m001"))


@pytest.mark.parametrize("select_from, kept", [(0, 2), (4, 4), (99, 6)])
def test_early_stopping_keeps_no_state_before_select_from(tiny_chat_model, select_from, kept):
    """Scores that fall (3, 2, 1 at steps 2, 4, 6): the best state from step ``select_from`` on
    is kept and restored (past the last step: the last state)."""
    pm, trunk = _expert(tiny_chat_model[0])
    rng = np.random.default_rng(5)
    own = [Item(Sequence(rng.integers(3, 200, 6).tolist(), rng.integers(3, 200, 4).tolist()))
           for _ in range(4)]
    trunk.cache(own)
    params = [p for p in pm.parameters() if p.requires_grad]
    states, scores = {}, iter([3.0, 2.0, 1.0])

    def select():
        states[len(states) * 2 + 2] = [p.detach().clone() for p in params]
        return {"score": next(scores)}
    rc = Recipe(steps=6, lr=2e-2, pairs=2, retain=0, distill=0, raw=0, arith=0, w_pair=0.0,
                w_kl=0.0, eval_every=2, select_from=select_from)
    _, best = train_expert(trunk, params, Pools(own, own, [], []), rc, seed=0, select=select)
    assert best["step"] == kept
    assert all(torch.equal(p, s) for p, s in zip(params, states[kept]))
    assert not all(torch.equal(p, s) for p, s in zip(params, states[6 if kept != 6 else 2]))
