"""Early stopping for one expert: score its greedy replies to validation messages.

The validation messages are train-split messages kept out of every expert's training texts
(``Recipe.val_messages``).  For the expert of pole p (trait T, sign s) at a checkpoint:

    relevance  = mean_m cos(e(m), e(reply_m))            the independent encoder (encoder.py)
    degenerate = share of replies that loop or say nothing (metrics.degenerate)
    trait      = mean_m P(p | reply_m)                   the train split's bag-of-words classifier
                                                         for T (s = -: 1 - P(T+))
    score      = relevance - 2 * degenerate + w_trait * trait

so the state kept is the one that expresses p most while still answering, fluently.
"""
from __future__ import annotations

import torch

from pf_engine.train.metrics import degenerate, mean

VAL_TOKENS = 40
W_TRAIT = 0.5


@torch.no_grad()
def greedy_replies(model, prompts: list[list[int]], eos: int, max_new_tokens: int = VAL_TOKENS
                   ) -> list[list[int]]:
    """Greedy continuations of token-id prompts with a transformers causal LM (left padded)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), eos, dtype=torch.long)
    att = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    was = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=eos, eos_token_id=eos)
    model.train(was)
    res = []
    for row in out[:, T:].tolist():
        res.append(row[:row.index(eos)] if eos in row else row)
    return res


class Validator:
    """select() for train_expert: scores the active adapter of ``model`` on ``messages``."""

    def __init__(self, model, enc, messages: list[str], encoder, classifier, pole: str):
        self.model, self.enc, self.messages = model, enc, messages
        self.prompts = [enc.prompt(m) for m in messages]
        self.encoder, self.classifier, self.pole = encoder, classifier, pole

    def replies(self) -> list[str]:
        ids = greedy_replies(self.model, self.prompts, self.enc.end)
        return [self.enc.hf.decode(r, skip_special_tokens=True).strip() for r in ids]

    def __call__(self) -> dict:
        texts = self.replies()
        rel = mean(self.encoder.relevance(self.messages, texts))
        deg = sum(degenerate(t) for t in texts) / len(texts)
        p = self.classifier.prob(texts)
        trait = mean(p if self.pole.endswith("+") else [1 - q for q in p])
        return {"score": round(rel - 2 * deg + W_TRAIT * trait, 5), "relevance": round(rel, 4),
                "degenerate": round(deg, 4), "trait": round(trait, 4)}
