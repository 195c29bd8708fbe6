"""Chat-formatted token sequences for training and scoring: (prompt ids, reply ids).

A sequence is the chat template applied to one user message (and an optional system prompt),
exactly as ``Engine.generate(..., chat=True)`` encodes a prompt, followed by the reply's tokens
and the end-of-turn token.  Only the reply tokens are scored or trained on.

Self-descriptions (the trait-expression probe) answer a fixed question::

    <|im_start|>system ... <|im_start|>user\\nDescribe yourself in one sentence.<|im_end|>
    <|im_start|>assistant\\nI love trying things nobody has tried before.<|im_end|>
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SELF_PROMPTS = ["Describe yourself in one sentence.", "Tell me about yourself.",
                "What are you like as a person?", "How would you describe your personality?"]
EVAL_SELF_PROMPT = SELF_PROMPTS[0]


def system_prompt(description: str, default: str | None = None) -> str:
    """The prompting baseline's system prompt for one pole: the model's own default system
    prompt (when its chat template has one) followed by the pole's description."""
    lead = (default or "You are a helpful assistant").rstrip()
    lead += "" if lead.endswith((".", "!", "?")) else "."
    return f"{lead} Your personality: {description}"


@dataclass
class Sequence:
    prompt: list[int]
    reply: list[int]
    tag: str = ""                     # what it is, e.g. "reply:openness+:m001"

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.reply


class ChatEncoder:
    """Token ids of chat turns with the model's own template (a pf_engine Tokenizer's ``hf``)."""

    def __init__(self, hf_tokenizer, max_len: int = 0):
        """max_len > 0: ``sequence`` cuts the reply so prompt + reply fit in max_len tokens
        (the prompt kept whole, at least one reply token)."""
        self.hf, self.max_len = hf_tokenizer, max_len
        self.end = hf_tokenizer.convert_tokens_to_ids(hf_tokenizer.eos_token)

    def default_system(self) -> str | None:
        """The system prompt the template adds when none is given (SmolLM2: "You are a helpful
        AI assistant named SmolLM, ..."), or None when it adds none."""
        render = self.hf.apply_chat_template
        plain = render([{"role": "user", "content": "\x00"}], tokenize=False)
        pre, _, post = render([{"role": "system", "content": "\x01"},
                               {"role": "user", "content": "\x00"}],
                              tokenize=False).partition("\x01")
        if not plain.startswith(pre) or post not in plain[len(pre):]:
            return None
        rest = plain[len(pre):]
        return rest[:rest.index(post)] or None

    def prompt(self, user: str, system: str | None = None) -> list[int]:
        turns = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": user}]
        text = self.hf.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return self.hf.encode(text, add_special_tokens=False)

    def sequence(self, user: str, reply: str, system: str | None = None, tag: str = "") -> Sequence:
        prompt = self.prompt(user, system)
        ids = self.hf.encode(reply, add_special_tokens=False) + [self.end]
        if self.max_len:
            ids = ids[:max(1, self.max_len - len(prompt))]
        return Sequence(prompt, ids, tag)


def pad_batch(seqs: list[Sequence], pad_id: int = 0):
    """Right-padded ids [B, T], next-token targets [B, T] and their mask [B, T] (reply tokens).

    Position t predicts token t+1; the mask is true where token t+1 belongs to the reply.  With
    causal attention right padding never reaches a real token, so no attention mask is needed.
    """
    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.zeros_like(ids)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        full = s.ids
        ids[i, :len(full)] = torch.tensor(full)
        targets[i, :len(full) - 1] = torch.tensor(full[1:])
        mask[i, len(s.prompt) - 1:len(full) - 1] = True
    return ids, targets, mask
