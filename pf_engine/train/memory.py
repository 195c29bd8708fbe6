"""pf-train's sizes from the memory it has: the sequence length, the LM head's chunk of
tokens and the rows of the passes that fill its caches.  On a GPU they come from the free
memory (``plan``); the CPU keeps the recipe's (512 tokens, the whole head at once, 16 rows), so
CPU banks train bit for bit as before.

Per token, for a base with n adapted (top) layers, hidden size d, MLP width I, vocabulary V
and b bytes per value of its compute dtype:

    A    = (6 d + 4 I) b    one layer's activations kept for the backward pass (norm, q, k, v,
                            attention out, o; gate, up, act, product); attention by SDPA keeps
                            no T x T scores
    kept = d b              what a top layer keeps under gradient checkpointing (its input);
                            A without checkpointing
    H    = 16 V             the LM head on one reply token: fp32 logits, log-softmax and its
                            gradient, and the base's log-softmax in the KL term

A training step runs R rows (the recipe's largest batch) of at most T tokens, the head in
chunks of C tokens (``Trunk.head_chunk``: each chunk's logits are recomputed in the backward
pass, so only one chunk's exist at a time):

    step(T, C) = R T (n kept + A) + C H  <=  budget = 0.8 free

``plan`` takes T = the largest power of two <= ``cap`` with R T (n kept + A) <= budget / 2 (or
the T asked for, checked), C = what is left of the budget over H (0, the whole head, when that
covers every token of the step) and, for the passes that fill the caches (the trunk's states,
the base model's likelihoods and top states), rows = budget / (2 T A) in 1..64.

pf-train plans twice (``gpu_plan``): T before the training copy loads (its weights, from the
config, taken off the free memory; the engine that wrote the base model's replies already let
go), then C and the rows again once the copy and the trunk cache (each sequence's states at the
first adapted layer) are on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from pf_engine.errors import PFError

BUDGET = 0.8          # of the free memory; the rest: allocator slack, optimiser state, gates
HEAD_BYTES = 16       # per vocabulary entry and reply token (module doc)
LEAST_LEN = 64        # a shorter sequence cannot hold a chat prompt and a reply
LEAST_CHUNK = 64      # LM head tokens per chunk at least


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a model: hidden size, MLP width, vocabulary, adapted layers,
    bytes per value, whether the top layers recompute in backward, and its longest context."""
    hidden: int
    mlp: int
    vocab: int
    top_layers: int
    value_bytes: int
    checkpointing: bool
    max_positions: int = 1 << 30

    @classmethod
    def of(cls, config, top_layers: int, value_bytes: int, checkpointing: bool) -> "Shape":
        """From a transformers config."""
        return cls(config.hidden_size, config.intermediate_size, config.vocab_size, top_layers,
                   value_bytes, checkpointing,
                   getattr(config, "max_position_embeddings", None) or 1 << 30)

    def layer_bytes(self) -> int:
        """A: one layer's activations per token."""
        return (6 * self.hidden + 4 * self.mlp) * self.value_bytes

    def row_bytes(self) -> int:
        """Per token of a training row: what every top layer keeps plus one layer's recompute."""
        kept = self.hidden * self.value_bytes if self.checkpointing else self.layer_bytes()
        return self.top_layers * kept + self.layer_bytes()


@dataclass(frozen=True)
class Plan:
    max_len: int          # tokens per training sequence at most
    head_chunk: int       # LM head tokens at once in training (0: all)
    rows: int             # rows per pass filling the caches (no gradients)
    free_bytes: int       # what it was planned for
    step_bytes: int       # the estimate of one step's peak at those sizes

    def as_dict(self) -> dict:
        return {"max_len": self.max_len, "head_chunk": self.head_chunk, "rows": self.rows,
                "free_gib": round(self.free_bytes / 2**30, 2),
                "step_gib": round(self.step_bytes / 2**30, 2)}


def plan(free_bytes: int, shape: Shape, rows: int, max_len: int = 0, cap: int = 512) -> Plan:
    """The sizes for ``rows`` training rows in ``free_bytes`` (module doc).  max_len > 0: that
    length, checked; 0: the longest power of two up to ``cap`` (and the model's context) that
    fits.  A PFError names the memory when not even the shortest fits."""
    budget = int(BUDGET * free_bytes)
    per_row_token = rows * shape.row_bytes()
    head = HEAD_BYTES * shape.vocab
    need = f"{rows} rows of {{}} tokens need {{:.2f}} GiB of the {free_bytes / 2**30:.2f} GiB free"
    if max_len:
        if max_len > shape.max_positions:
            raise PFError(f"max-len {max_len}: the model reads at most {shape.max_positions} "
                          "tokens")
        if per_row_token * max_len + LEAST_CHUNK * head > budget:
            raise PFError(f"max-len {max_len}: " + need.format(
                max_len, (per_row_token * max_len + LEAST_CHUNK * head) / BUDGET / 2**30)
                + "; pass a smaller --max-len")
        length = max_len
    else:
        length = 1 << (min(cap, shape.max_positions).bit_length() - 1)
        while length > LEAST_LEN and per_row_token * length > budget // 2:
            length //= 2
        if per_row_token * length + LEAST_CHUNK * head > budget:
            raise PFError("not enough GPU memory to train: " + need.format(
                length, (per_row_token * length + LEAST_CHUNK * head) / BUDGET / 2**30))
    left = budget - per_row_token * length
    chunk = max(LEAST_CHUNK, left // head)
    if chunk >= rows * length:
        chunk = 0
    no_grad_rows = max(1, min(64, budget // (2 * length * shape.layer_bytes())))
    return Plan(length, chunk, no_grad_rows, free_bytes,
                per_row_token * length + (chunk or rows * length) * head)


def step_rows(recipe) -> int:
    """The most rows one training step of the recipe runs through the top layers together:
    an expert step's own, twin and kept texts, its KL batch, or the joint stage's pairs (two
    called-for poles per situation, each with its twin)."""
    return max(2 * recipe.pairs + recipe.retain, recipe.distill + recipe.raw + recipe.arith,
               4 * recipe.joint_batch)


def gpu_plan(model_dir: str, recipe, device, value_bytes: int, loaded: bool = False) -> Plan:
    """``plan`` for the recipe on ``device`` (cuda), from the free memory now and the model's
    config.  loaded False: the training copy is not on the GPU yet, so its weights (from the
    config's sizes) are taken off the free memory; True: it is, with the trunk cache, and
    ``recipe.max_len`` is the length chosen before (pf-train plans at both points)."""
    import torch
    from transformers import AutoConfig
    from pf_engine.train.prepare import first_adapted
    config = AutoConfig.from_pretrained(model_dir)
    L = config.num_hidden_layers
    shape = Shape.of(config, L - first_adapted(recipe, L), value_bytes,
                     True if recipe.checkpointing is None else recipe.checkpointing)
    free, _ = torch.cuda.mem_get_info(device)
    if not loaded:
        free = max(0, free - weight_bytes(config, value_bytes))
    return plan(free, shape, step_rows(recipe), recipe.max_len)


def weight_bytes(config, value_bytes: int) -> int:
    """The bytes of a Llama-family model's weights at ``value_bytes`` per value, from its
    config: embeddings (and an untied head), attention with grouped KV heads, the gated MLP."""
    d, I, V, L = (config.hidden_size, config.intermediate_size, config.vocab_size,
                  config.num_hidden_layers)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    embed = V * d * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return (embed + L * (attn + 3 * d * I)) * value_bytes
