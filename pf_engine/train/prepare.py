"""pf-train's inputs, prepared once before any expert trains (recipe.py runs them in order).

    train_ids, val_ids = split_messages(corpus, recipe)     # early stopping's messages kept out
    distilled, raw, (sits, feats, targets), formats = from_engine(   # the served engine's part:
        corpus, model, recipe, (dev, dtype), (enc, encoder), held, progress)   # then let go
    items, neutral, (distill, raw), safety, trunk = cached_items(
        corpus, enc, served, (dev, dtype), recipe, train_ids, distilled.pairs, raw, pairs,
        progress, sizes)                                      # sizes: memory.py's plan on a GPU

Every text becomes an ``experts.Item`` (the chat template's tokens, which of them are the reply);
the frozen bottom layers run once over all of them (``experts.Trunk.cache``) on the base as served,
and each item keeps the base model's log-likelihood (and, for the KL term's items, its top
states) so a training step only runs the adapted top layers.  ``recipe`` is a recipe.Recipe.
"""
from __future__ import annotations

import torch

from pf_engine.errors import PFError
from pf_engine.train.data import Corpus, trait_of
from pf_engine.train.experts import Item, Trunk, load_hf_model
from pf_engine.train.sequences import SELF_PROMPTS, ChatEncoder
from pf_engine.train.served import serve_like


def split_messages(corpus: Corpus, recipe) -> tuple[list[str], list[str]]:
    """(training message ids, validation message ids): every ``n``-th message (sorted ids) is
    kept out of training for early stopping, ``recipe.val_messages`` of them."""
    mids = sorted(corpus.train.messages)
    if recipe.limit:
        mids = mids[:recipe.limit + recipe.val_messages]
    n = recipe.val_messages
    val = mids[::max(1, len(mids) // n)][:n] if n else []
    return [m for m in mids if m not in val], val


def build_items(corpus: Corpus, enc: ChatEncoder, limit: int = 0,
                mids: list[str] | None = None) -> dict[str, list[Item]]:
    """Per pole: its replies (message order) then its self-descriptions, as training items.

    Items of opposite poles line up: item i of ``p`` and of ``opposite(p)`` answer the same
    message (or sit in the same statement slot), which is what the pairwise term compares.
    mids: the messages to use (default all of them).
    """
    split = corpus.train
    mids = sorted(split.messages) if mids is None else list(mids)
    n_st = min(len(split.statements[p]) for p in corpus.poles)
    if limit:
        mids, n_st = mids[:limit], min(n_st, limit)
    items = {}
    for p in corpus.poles:
        seqs = [enc.sequence(split.messages[m], split.replies[p][m], tag=f"reply:{p}:{m}")
                for m in mids]
        seqs += [enc.sequence(SELF_PROMPTS[i % len(SELF_PROMPTS)], split.statements[p][i],
                              tag=f"statement:{p}:{i}") for i in range(n_st)]
        items[p] = [Item(s) for s in seqs]
    return items


def distilled_replies(eng, corpus, encoder, recipe, progress: bool, held=frozenset()):
    """distill.base_replies on the held-in prompts (``held``: look-alikes kept out for
    validation), with a progress bar: the base model's kept replies for the KL term."""
    from tqdm.auto import tqdm

    from pf_engine.train.distill import base_replies, held_in_prompts
    limit = recipe.limit * 4 if recipe.limit else 0
    benign = recipe.safety > 0       # the safety term's look-alikes join the KL term with it
    n = limit or len(held_in_prompts(corpus.train, benign, held))
    with tqdm(total=n, desc="base replies", disable=not progress, unit="prompt") as bar:
        return base_replies(eng, corpus.train, encoder, limit=limit, progress=bar, benign=benign,
                            held=held)


def raw_continuations(eng, corpus, recipe, progress: bool):
    """raw.raw_sequences: the base model's plain-text continuations of the split's questions
    (none if recipe.raw is 0) and of arithmetic questions (tagged raw.ARITH_TAG; none if
    recipe.arith is 0)."""
    from tqdm.auto import tqdm

    from pf_engine.train.raw import ARITH_TAG, arith_prompts, raw_prompts, raw_sequences
    text = raw_prompts(corpus.train, recipe.limit) if recipe.raw else []
    arith = arith_prompts(recipe.limit) if recipe.arith else []
    with tqdm(total=len(text) + len(arith), desc="raw continuations", disable=not progress,
              unit="prompt") as bar:
        return (raw_sequences(eng, text, progress=bar)
                + raw_sequences(eng, arith, progress=bar, tag=ARITH_TAG))


def from_engine(corpus, model, recipe, device, encoders, held: set, progress: bool):
    """What the served engine gives before training: the base model's kept replies (distill.py),
    its raw continuations (raw.py), the router's situations, features and targets, and its
    weight formats.  On a GPU the engine is then let go, so the training copy and the memory
    plan have its memory."""
    from pf_engine.engine import Engine
    from pf_engine.train.router import router_data
    dev, dtype = device
    enc, encoder = encoders
    eng = Engine.from_pretrained(model, device=str(dev), dtype=dtype, quantize=recipe.quantize,
                                 progress=False)
    distilled = distilled_replies(eng, corpus, encoder, recipe, progress, held)
    raw = raw_continuations(eng, corpus, recipe, progress)
    routing = router_data(corpus, enc, eng, recipe, progress)
    formats = eng.weight_formats
    if dev.type == "cuda":
        import gc
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    return distilled, raw, routing, formats


def first_adapted(recipe, layers: int) -> int:
    """The first adapted layer of a model with ``layers`` layers (recipe.first_layer; -n: the
    top n), or a PFError."""
    first = recipe.first_layer % layers if recipe.first_layer < 0 else recipe.first_layer
    if not 0 <= first < layers:
        raise PFError(f"first_layer {recipe.first_layer} is outside the model's 0..{layers - 1}")
    return first


def cached_items(corpus, enc, served, device, recipe, mids, distilled, raw, pairs,
                 progress: bool, sizes=None):
    """Tokenised items per pole, the neutral ones and the KL term's (the base model's chat
    replies, its raw continuations ``raw``), with trunk outputs and base likelihoods (and, for
    the KL ones, the base model's top states), on the base as served (``served``:
    served_weights' folder, config and weights; ``device``: (torch device, dtype name), as
    recipe.compute_device gives), and the harmful requests with their refusals
    (safety.jsonl's ``pairs``: data.split_safety's training ones) and the same refusals after
    their look-alikes.  sizes: memory.py's Plan on a GPU (the LM head's chunk, the rows of
    passes without gradients), None on the CPU.  Returns (items, neutral, (distill, raw),
    (refusals, their twins), trunk)."""
    from tqdm.auto import tqdm

    from pf_engine.engine import DTYPES
    items = build_items(corpus, enc, recipe.limit, mids)
    folder, cfg, weights = served
    dev, dtype = device
    hf = load_hf_model(folder, DTYPES[dtype], dev)
    if weights is not None:
        serve_like(hf, cfg, weights, recipe.round_activations)
    first = first_adapted(recipe, hf.config.num_hidden_layers)
    trunk = Trunk(hf, first, dev.type != "cpu" if recipe.checkpointing is None
                  else recipe.checkpointing, *((sizes.head_chunk, sizes.rows) if sizes else ()))
    neutral = [Item(enc.sequence(q, a, tag=f"neutral:{i}")) for i, (q, a) in
               enumerate(corpus.train.neutral[:recipe.limit or None])]
    distill = [Item(enc.sequence(q, a, tag=f"distill:{i}")) for i, (q, a) in enumerate(distilled)]
    raw = [Item(s) for s in raw]
    pairs = pairs[:recipe.limit or None] if recipe.safety else []
    safety = ([Item(enc.sequence(h["prompt"], h["reply"], tag=f"safety:{h['id']}"))
               for h, _ in pairs],
              [Item(enc.sequence(b["prompt"], h["reply"], tag=f"safety:{h['id']}:{b['id']}"))
               for h, b in pairs] if recipe.w_safety_pair else [])
    every = ([it for p in corpus.poles for it in items[p]] + neutral + distill + raw
             + safety[0] + safety[1])
    with tqdm(total=len(every), desc="trunk cache", disable=not progress, unit="seq") as bar:
        trunk.cache(every, progress=bar)
    with torch.no_grad():
        for i in range(0, len(every), trunk.rows):
            chunk = every[i:i + trunk.rows]
            for it, lp in zip(chunk, trunk.log_likelihood(chunk).tolist()):
                it.base_lp = lp
    trunk.cache_base_top(distill + raw)
    return items, neutral, (distill, raw), safety, trunk


def trait_classifier(corpus, pole: str, mids):
    """The bag-of-words classifier of pole's trait on the training messages' replies and the
    statements (validation messages left out)."""
    from pf_engine.train.metrics import TraitClassifier
    t, split = trait_of(pole), corpus.train

    def texts(q):
        return [split.replies[q][m] for m in mids] + split.statements[q]
    return TraitClassifier(texts(t + "+"), texts(t + "-"))
