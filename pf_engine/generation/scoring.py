"""Log-probabilities as OpenAI reports them, and prompt scoring without decoding.

A logprob here is the model's own distribution: log_softmax of its fp32 logits at that position,
before repetition penalty, temperature, top-k and top-p.  So it does not depend on the sampling
fields of the request, and greedy decoding without a penalty picks the token whose logprob is
the largest.

    logprobs_of(logits [n, V], chosen [n], top) -> [Logprob] * n        (one host transfer)
    score(engine, prompts, persona, top) -> per prompt [None, Logprob, ...]

``score`` runs one forward over a batch of prompts (right-padded into chunks of at most
``chunk_tokens`` positions; causal attention keeps the padding out of every real position) and
no decode: position t's logits give the logprob of token t + 1, and the first token has none.
Sequence-routed rows ("auto") are routed on their own unpadded prompt first.
"""
from __future__ import annotations

import torch

from pf_engine.errors import RequestError
from pf_engine.outputs import Logprob
from pf_engine.persona.specs import Personas
from pf_engine.generation.sampling import MAX_LOGPROBS

CHUNK_TOKENS = 2048        # padded positions per scoring forward (its logits: that many x vocab)


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[Logprob]:
    """logits [n, V] (any float dtype), chosen token ids [n] -> one Logprob per row, with the
    ``top`` most likely tokens of its row."""
    lp = torch.log_softmax(logits.float(), dim=-1)                      # (n, V)
    own = lp.gather(1, chosen.view(-1, 1).to(lp.device)).view(-1)      # (n,)
    if top:
        values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)          # (n, top)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in range(lp.shape[0])]
    return [Logprob(int(t), float(o), tp) for t, o, tp in zip(chosen.tolist(), own.tolist(), tops)]


def check_prompts(prompts, vocab: int, context: int) -> list[list[int]]:
    """A non-empty list of non-empty token-id lists, each id in [0, vocab), each within the
    context; one RequestError naming the first bad prompt."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("prompts: expected a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        ok = isinstance(p, (list, tuple)) and p and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p)
        if not ok:
            raise RequestError(f"prompts[{i}]: expected a non-empty list of token ids in "
                               f"[0, {vocab})")
        if len(p) > context:
            raise RequestError(f"prompts[{i}] has {len(p)} tokens; the context holds {context}")
        out.append(list(p))
    return out


def score(engine, prompts, persona=None, top: int = 0,
          chunk_tokens: int = CHUNK_TOKENS) -> list[list[Logprob | None]]:
    """Per prompt: [None] + the Logprob of each later token given the ones before it."""
    cfg = engine.config
    prompts = check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
        raise RequestError(f"top_logprobs={top!r}: expected an integer in 0..{MAX_LOGPROBS}")
    return score_rows(engine, prompts, Personas(engine.bank, persona, len(prompts)), top,
                      chunk_tokens)


@torch.inference_mode()
def score_rows(engine, prompts: list[list[int]], personas: Personas, top: int,
               chunk_tokens: int = CHUNK_TOKENS) -> list[list[Logprob | None]]:
    """``score`` for checked prompts and their Personas (routed here, in place: their
    ``report`` then gives each prompt's gates)."""
    personas.route_each(engine.model, prompts)
    out: list[list[Logprob | None]] = [[] for _ in prompts]
    for rows in _chunks([len(p) for p in prompts], chunk_tokens):
        T = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([prompts[i] + [0] * (T - len(prompts[i])) for i in rows],
                           device=engine.device)
        logits = engine.forward_rows(ids, personas.select(rows))             # (b, T, V)
        for b, i in enumerate(rows):
            n = len(prompts[i])
            nxt = torch.tensor(prompts[i][1:], device=engine.device)
            out[i] = [None] + (logprobs_of(logits[b, :n - 1], nxt, top) if n > 1 else [])
    return out


def _chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Prompt indices in groups whose padded size (rows x longest) stays within ``budget``
    (a prompt longer than the budget goes alone); prompts of similar length are grouped."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups
