"""pf-train's recipe: ten persona experts and the situation router, written as one bank file.

    bank = train_bank("data/personas", "bigfive.safetensors")          # the full recipe
    bank = train_bank(..., quick=True)                                 # a tiny one, for tests

Steps: read the train split (never heldout/); tokenise every reply and self-description with the
model's chat template; run the frozen bottom layers once for all of them (experts.Trunk); train one
LoRA per pole with peft; save the experts as PEFT folders and stack them with
``AdapterBank.from_peft``; train the sequence router on the situations; store in fp16 with the
recipe in the bank's metadata; write the file atomically.  An interrupted run leaves no bank.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from pf_engine.model.config import HF_MODULE_NAMES
from pf_engine.errors import PFError
from pf_engine.train.data import TRAITS, Corpus, load_corpus, opposite, trait_of
from pf_engine.train.experts import Item, Pools, Trunk, load_hf_model, train_expert
from pf_engine.train.router import pooled_states, train_router
from pf_engine.train.sequences import SELF_PROMPTS, ChatEncoder


@dataclass
class Recipe:
    rank: int = 8
    alpha: float = 16.0
    modules: tuple = ("q", "v", "o", "up", "down")
    first_layer: int = 18            # layers first_layer..L-1 are adapted (-n: the top n)
    steps: int = 36                  # optimiser steps per expert
    pairs: int = 4                   # own texts (and their opposite-pole twins) per step
    retain: int = 4                  # other traits' / neutral texts per step
    lr: float = 2e-3
    beta: float = 5.0                # pairwise term's sharpness (per-token nats)
    w_pair: float = 1.0
    w_retain: float = 4.0
    limit: int = 0                   # use at most this many texts per pole and kind (0: all)
    router_hidden: int = 64
    router_steps: int = 300
    router_layers: tuple = (3, 6, 9, 12, 15, 18, 21, 24, 27)
    router_balance: float = 0.05
    router_top_k: int = 2
    seed: int = 0
    storage_dtype: str = "fp16"

    @classmethod
    def quick(cls) -> "Recipe":
        """Minutes-free: two adapted layers, rank 2, two steps per expert, a few texts."""
        return cls(rank=2, alpha=4.0, first_layer=-2, steps=2, pairs=2, retain=2, limit=3,
                   router_steps=30, router_layers=(6, 12), router_hidden=16)


def _git_commit() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha or None, "dirty": bool(dirty) if sha else None}


def _versions() -> dict:
    import peft
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def build_items(corpus: Corpus, enc: ChatEncoder, limit: int = 0) -> dict[str, list[Item]]:
    """Per pole: its replies (message order) then its self-descriptions, as training items.

    Items of opposite poles line up: item i of ``p`` and of ``opposite(p)`` answer the same
    message (or sit in the same statement slot), which is what the pairwise term compares.
    """
    split = corpus.train
    mids = sorted(split.messages)
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


def _check_output(output: str, overwrite: bool) -> str:
    output = os.fspath(output)
    if os.path.exists(output) and not overwrite:
        raise PFError(f"{output} already exists: pass overwrite=True (pf-train: --overwrite) "
                      "to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise PFError(f"cannot write {output}: folder {folder} does not exist")
    return output


def train_bank(data_dir, output, model=None, quick: bool = False, overwrite: bool = False,
               recipe: Recipe | None = None, peft_dir=None, progress: bool = True):
    """Train the ten experts and the router on ``data_dir``'s train split; write ``output``.

    model: the base (None: the bundled SmolLM2-135M-Instruct).  recipe: the hyper-parameters
    (default ``Recipe()``, or ``Recipe.quick()`` with quick=True).  peft_dir: also keep the
    experts' PEFT folders there.  Returns the AdapterBank written.
    """
    from pf_engine.engine import DTYPES, resolve_model
    from pf_engine.tokenizer import Tokenizer

    output = _check_output(output, overwrite)
    recipe = recipe or (Recipe.quick() if quick else Recipe())
    corpus = load_corpus(data_dir, splits=("train",))
    if peft_dir is not None and os.path.exists(peft_dir) and os.listdir(peft_dir) \
            and not overwrite:
        raise PFError(f"{peft_dir} is not empty: pass overwrite=True (--overwrite) to reuse it")
    model_dir = resolve_model(model, progress)
    t_start = time.perf_counter()
    source = _git_commit()          # the code that trains, read before anything can change it
    torch.manual_seed(recipe.seed)
    enc = ChatEncoder(Tokenizer(model_dir).hf)
    items, neutral, trunk = _cached_items(corpus, enc, model_dir, recipe, progress)
    pm, names, logs = _train_experts(corpus, items, neutral, trunk, recipe, progress)
    bank = _assemble(pm, names, corpus.poles, model_dir, peft_dir)
    bank.router, router_report = _train_router(corpus, enc, model_dir, recipe,
                                               len(trunk.inner.layers), progress)
    bank.recipe = {
        "recipe": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(recipe).items()},
        "quick": quick, "data_sha256": corpus.digest["train"], "seed": recipe.seed,
        "versions": _versions(), **source, "threads": torch.get_num_threads(),
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "router": router_report, "traits": TRAITS,
        "final_loss": {p: log[-1] for p, log in logs.items()},
    }
    bank.to(dtype=DTYPES[recipe.storage_dtype])
    bank.save(output, overwrite=overwrite)
    return bank


def _cached_items(corpus, enc, model_dir, recipe: Recipe, progress: bool):
    """Tokenised items per pole and the neutral ones, with trunk outputs and base likelihoods."""
    from tqdm.auto import tqdm
    items = build_items(corpus, enc, recipe.limit)
    hf = load_hf_model(model_dir)
    L = hf.config.num_hidden_layers
    first = recipe.first_layer % L if recipe.first_layer < 0 else recipe.first_layer
    if not 0 <= first < L:
        raise PFError(f"first_layer {recipe.first_layer} is outside the model's 0..{L - 1}")
    trunk = Trunk(hf, first)
    neutral = [Item(enc.sequence(q, a, tag=f"neutral:{i}")) for i, (q, a) in
               enumerate(corpus.train.neutral[:recipe.limit or None])]
    every = [it for p in corpus.poles for it in items[p]] + neutral
    with tqdm(total=len(every), desc="trunk cache", disable=not progress, unit="seq") as bar:
        trunk.cache(every, progress=bar)
    with torch.no_grad():
        for i in range(0, len(every), 16):
            chunk = every[i:i + 16]
            for it, lp in zip(chunk, trunk.log_likelihood(chunk).tolist()):
                it.base_lp = lp
    return items, neutral, trunk


def _train_experts(corpus, items, neutral, trunk: Trunk, recipe: Recipe, progress: bool):
    """One peft adapter per pole (named e0.. in bank order) on the trunk's top layers."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    L = len(trunk.inner.layers)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",
                        target_modules=[HF_MODULE_NAMES[m].split(".")[-1]
                                        for m in recipe.modules],
                        layers_to_transform=list(range(trunk.first, L)))
    names = [f"e{k}" for k in range(len(corpus.poles))]
    torch.manual_seed(recipe.seed)
    pm = get_peft_model(trunk.model, config, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, config)
    logs = {}
    for k, pole in enumerate(corpus.poles):
        pm.set_adapter(names[k])
        params = [p for p in pm.parameters() if p.requires_grad]
        keep = [it for q in corpus.poles if trait_of(q) != trait_of(pole) for it in items[q]]
        pools = Pools(items[pole], items[opposite(pole)], keep + neutral)
        with tqdm(total=recipe.steps, desc=f"expert {pole}", disable=not progress) as bar:
            logs[pole] = train_expert(trunk, params, pools, recipe.steps, recipe.lr, recipe.pairs,
                                      recipe.retain, recipe.beta, recipe.w_pair,
                                      recipe.w_retain, recipe.seed + k, progress=bar)
    return pm, names, logs


def _assemble(pm, names: list[str], poles: list[str], model_dir: str, peft_dir):
    """Save each adapter as a PEFT folder and stack them with the bank's own PEFT import."""
    from pf_engine.persona.bank import AdapterBank
    from pf_engine.model.config import ModelConfig
    base_config = ModelConfig.from_file(os.path.join(model_dir, "config.json"))
    with tempfile.TemporaryDirectory(prefix="pf-train-") as tmp:
        where = peft_dir or tmp
        folders = {}
        for name, pole in zip(names, poles):
            pm.save_pretrained(where, selected_adapters=[name])
            folders[pole] = os.path.join(where, pole)       # PEFT names it after the adapter
            shutil.rmtree(folders[pole], ignore_errors=True)
            os.replace(os.path.join(where, name), folders[pole])
        return AdapterBank.from_peft(base_config, folders, dtype=torch.float32)


def _train_router(corpus, enc, model_dir: str, recipe: Recipe, num_layers: int, progress: bool):
    """The sequence router on the engine's own pooled hidden states (what persona="auto" reads)."""
    from tqdm.auto import tqdm

    from pf_engine.engine import Engine
    eng = Engine(model_dir, torch.device("cpu"), torch.float32)
    sits = corpus.train.situations[:recipe.limit * 4 or None]
    prompts = [enc.prompt(s["text"]) for s in sits]
    targets = torch.tensor([[s["target"].get(p, 0.0) for p in corpus.poles] for s in sits])
    with tqdm(total=len(prompts), desc="router features", disable=not progress) as bar:
        feats = pooled_states(eng.model, prompts, progress=bar)
    layers = [l for l in recipe.router_layers if l <= num_layers] or [num_layers]
    return train_router(feats, targets, layers, hidden=recipe.router_hidden,
                        steps=recipe.router_steps, w_balance=recipe.router_balance,
                        top_k=recipe.router_top_k, seed=recipe.seed)
