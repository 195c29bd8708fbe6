"""pf-train's recipe: ten persona experts and the situation router, written as one bank file.

    bank = train_bank("data/personas", "bigfive.safetensors")          # the full recipe
    bank = train_bank(..., quick=True)                                 # a tiny one, for tests

Steps: load the base as the engine serves it (``recipe.quantize``; train/served.py: the
transformers model gets the served weights and, through ``round_activations``, the served 8-bit
activation rounding; on ``device="cuda"`` the model's float weights at ``dtype``, as the GPU
engine serves them); read the train split (never heldout/); let the base model answer every
held-in prompt and keep the replies that are fluent, relevant and right (distill.py); tokenise
every reply and self-description with the model's chat template and run the frozen bottom layers
once for all of them (prepare.py, experts.Trunk); train one LoRA per pole with peft, early-stopped
on validation messages kept out of training (select.py), then tune each on its own sampled replies
with DPO (preference.py: the best against the worst or a looping one); save the experts as PEFT
folders and stack them with ``AdapterBank.from_peft``; train the sequence router, with its "none"
output, on the situations; train the experts and the router together on the routed mixture
(joint.py); optionally tune the routed mixture on its own replies to situations with DPO
(routed_pref.py; ``route_pref_steps``, off by default); store in fp16 with the recipe in the
bank's metadata; write the file atomically. An interrupted run leaves no bank.  ``start``
(pf-train --from) continues from a trained bank: its experts and router, then only the routed
preference stage (resume.py).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from pf_engine.engine import DTYPES
from pf_engine.model.config import HF_MODULE_NAMES
from pf_engine.errors import PFError
from pf_engine.train.data import (TRAITS, check_safety_pairs, load_corpus, opposite,
                                  safety_pairs, split_safety, trait_of)
from pf_engine.train.experts import Pools, Trunk, train_expert
from pf_engine.train.memory import gpu_plan
from pf_engine.train.preference import preference_stage
from pf_engine.train.prepare import (cached_items, from_engine, split_messages,
                                     trait_classifier)
from pf_engine.train.provenance import cpu_name, git_commit, versions
from pf_engine.train.raw import ARITH_TAG
from pf_engine.train.resume import bank_into_peft, continued_figures, load_start
from pf_engine.train.router import fit_router
from pf_engine.train.served import served_weights
from pf_engine.train.sequences import ChatEncoder


CPU_MAX_LEN = 512                    # tokens per training sequence on the cpu (Recipe.max_len 0)


@dataclass
class Recipe:
    rank: int = 8
    alpha: float = 16.0
    modules: tuple = ("q", "v", "o", "up", "down")
    first_layer: int = 18            # layers first_layer..L-1 are adapted (-n: the top n)
    steps: int = 30                  # optimiser steps per expert
    pairs: int = 4                   # own texts (and their opposite-pole twins) per step
    retain: int = 4                  # other traits' / neutral texts per step
    distill: int = 4                 # base-model replies per step (the KL term)
    raw: int = 2                     # its raw-text continuations per step, too (raw.py; 0: none)
    arith: int = 1                   # and its continuations of arithmetic questions (raw.py)
    kl_first: float = 0.0            # extra KL weight on their first token (experts.py)
    safety: int = 0                  # refusals of harmful requests per step (safety.jsonl; 0: none;
                                     # with 2 the experts over-refused: train/README.md)
    lr: float = 1.5e-3
    beta: float = 2.0                # pairwise term's sharpness (per-token nats)
    pair_cap: float = 0.5            # the pairwise margin stops pulling past this (nats/token)
    w_pair: float = 0.5
    w_retain: float = 4.0
    w_kl: float = 2.0
    w_safety: float = 1.0            # the refusals' NLL (experts.safety_terms)
    w_safety_pair: float = 1.0       # the refusal after a harmful request against after its
    safety_beta: float = 2.0         # benign look-alike (the contrast's weight, sharpness)
    eval_every: int = 10             # early stopping: score the expert every this many steps
    select_from: int = 20            # and keep no state before this step (0: any; step-10
                                     # states expressed their pole half as much: README)
    val_messages: int = 8            # train messages kept out of training, to score on
    val_safety: int = 0              # harmful requests of safety.jsonl, with their look-alikes,
                                     # kept out of training: refusals join the score (select.py)
    limit: int = 0                   # use at most this many texts per pole and kind (0: all)
    persona_strength: float = 0.75   # the router's target total weight where a persona is called
    router_none: bool = True         # the router has a "none" output (no persona called for)
    router_calibrate: bool = True    # its strength calibrated on held-out folds (train/router.py)
    router_hidden: int = 64
    router_steps: int = 300
    router_layers: tuple = (3, 6, 9, 12, 15, 18, 21, 24, 27)
    router_balance: float = 0.05
    router_top_k: int = 2
    seed: int = 0
    storage_dtype: str = "fp16"
    pref_steps: int = 20             # the preference stage (preference.py): DPO steps per
                                     # expert after its supervised ones (0: no stage)
    pref_messages: int = 12          # training messages the expert samples replies to
    pref_samples: int = 4            # replies per message
    pref_tokens: int = 48            # at most this many tokens each
    pref_temperature: float = 0.9
    pref_min_gap: float = 0.05       # a pair's least score gap
    pref_beta: float = 4.0           # DPO's beta on per-token mean log-likelihoods
    pref_lr: float = 5e-4
    joint_steps: int = 30            # the joint stage (joint.py): experts and router together on
                                     # the routed mixture (0: no stage)
    joint_batch: int = 4             # situations per step
    joint_lr: float = 5e-4           # the experts' learning rate there
    joint_router_lr: float = 1e-4    # the router's
    joint_val: int = 8               # every n-th train situation scores the stage, kept out
    route_pref_steps: int = 0        # the routed preference stage (routed_pref.py): DPO steps
                                     # on auto's own replies to situations (0: no stage)
    route_pref_situations: int = 32  # train situations auto samples replies to there
    quantize: str | None = None      # the base as served (Engine's quantize; None: the default)
    device: str = "cpu"              # where to train: cpu, or cuda (the GPU the engine serves on)
    dtype: str | None = None         # the base's compute dtype: fp32 on cpu; bf16 (default),
                                     # fp16 or fp32 on cuda (the adapters stay fp32)
    checkpointing: bool | None = None  # recompute the top layers in backward (None: on cuda)
    max_len: int = 0                 # tokens per training sequence at most (longer: cut); 0:
                                     # 512 on the cpu, on cuda the longest up to 512 that the
                                     # free GPU memory holds (memory.py)
    round_activations: bool = True   # through the served 8-bit activation rounding (served.py)

    @classmethod
    def quick(cls, **overrides) -> "Recipe":
        """Minutes-free: two adapted layers, rank 2, two steps per expert, a few texts."""
        return cls(**{**dict(rank=2, alpha=4.0, first_layer=-2, steps=2, pairs=2, retain=2,
                   distill=2, raw=1,
                   eval_every=2, val_messages=2, limit=3, router_steps=30, router_layers=(6, 12),
                   router_hidden=16, pref_steps=2, pref_messages=2, pref_samples=2, pref_tokens=8,
                   joint_steps=2, joint_batch=2, joint_val=4), **overrides})


def compute_device(recipe: Recipe) -> tuple[torch.device, str]:
    """(the device pf-train runs on, the base's dtype name), or a PFError naming what is wrong:
    the CPU computes in fp32 (--quantize picks the served weights); cuda needs a GPU."""
    if recipe.device not in ("cpu", "cuda"):
        raise PFError(f"device {recipe.device!r}: expected cpu or cuda")
    dtype = recipe.dtype or ("fp32" if recipe.device == "cpu" else "bf16")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise PFError(f"dtype {dtype!r}: expected fp32, bf16 or fp16")
    if recipe.device == "cpu" and dtype != "fp32":
        raise PFError(f"dtype {dtype} on the cpu: pf-train computes in fp32 there (--quantize "
                      "bf16 trains against bf16 weights as served)")
    if recipe.device == "cuda":
        if not torch.cuda.is_available():
            raise PFError("device cuda: no CUDA GPU is visible to torch")
        if recipe.quantize not in (None, "f32"):
            raise PFError(f"quantize {recipe.quantize!r} on cuda: the GPU engine serves float "
                          "weights (pass no --quantize)")
    return torch.device(recipe.device), dtype


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
               recipe: Recipe | None = None, peft_dir=None, progress: bool = True,
               start: str | None = None):
    """Train the ten experts and the router on ``data_dir``'s train split; write ``output``.

    model: the base (None: the bundled SmolLM2-135M-Instruct; an HF Llama-family folder; a
    .gguf).  recipe: the hyper-parameters (default ``Recipe()``, or ``Recipe.quick()`` with
    quick=True).  peft_dir: also keep the experts' PEFT folders there.  start: continue from
    this bank (a file or a shipped name; resume.py): its experts and router, then only the
    routed preference stage.  Returns the AdapterBank written.
    """
    from pf_engine.engine import resolve_model

    output = _check_output(output, overwrite)
    # a copy: _run sets its max_len (the plan's), the caller's recipe stays as it was
    recipe = dataclasses.replace(recipe or (Recipe.quick() if quick else Recipe()))
    compute_device(recipe)
    corpus = load_corpus(data_dir, splits=("train",))
    begun = None
    if start is not None:
        if not recipe.route_pref_steps:
            raise PFError(f"--from {start}: nothing to train after its stages (pass "
                          "--route-pref-steps N)")
        first, recipe = load_start(start, corpus.poles, recipe)
        begun = (first, start)
    if (recipe.safety and recipe.w_safety_pair) or recipe.val_safety:
        check_safety_pairs(corpus.train.safety)
    if peft_dir is not None and os.path.exists(peft_dir) and os.listdir(peft_dir) \
            and not overwrite:
        raise PFError(f"{peft_dir} is not empty: pass overwrite=True (--overwrite) to reuse it")
    model_dir = resolve_model(model, progress)
    t_start = time.perf_counter()
    source = git_commit()          # the code that trains, read before anything can change it
    bank, figures = _run(corpus, model, model_dir, recipe, peft_dir, progress, begun)
    bank.recipe = {
        "recipe": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(recipe).items()},
        "quick": quick, "data_sha256": corpus.digest["train"], "seed": recipe.seed,
        "versions": versions(), **source, "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "train_seconds": round(time.perf_counter() - t_start, 1), "traits": TRAITS, **figures}
    bank.to(dtype=DTYPES[recipe.storage_dtype])
    bank.save(output, overwrite=overwrite)
    return bank


def _run(corpus, model, model_dir: str, recipe: Recipe, peft_dir, progress: bool, begun=None):
    """The recipe's stages (the module doc); returns (the bank, its figures for the metadata).
    begun: (the bank to continue from, its name) or None (resume.py)."""
    from pf_engine.tokenizer import Tokenizer
    from pf_engine.train.encoder import SentenceEncoder
    torch.manual_seed(recipe.seed)
    dev, dtype = compute_device(recipe)
    enc = ChatEncoder(Tokenizer(model_dir).hf)   # prompts only until the plan sets max_len
    encoder = SentenceEncoder()
    train_ids, val_ids = split_messages(corpus, recipe)
    pairs, val_pairs = split_safety(safety_pairs(corpus.train.safety), recipe.val_safety)
    held = {b["prompt"] for _, b in val_pairs}
    distilled, raw, (sits, feats, targets), formats = from_engine(
        corpus, model, recipe, (dev, dtype), (enc, encoder), held, progress)
    sizes = memory_plan(model_dir, recipe, dev, dtype)
    recipe.max_len = enc.max_len = sizes.max_len if sizes else recipe.max_len or CPU_MAX_LEN
    served = (served_weights(model, recipe.quantize) if dev.type == "cpu"
              else (model_dir, None, None))
    items, neutral, kl, safety, trunk = cached_items(corpus, enc, served, (dev, dtype), recipe,
                                                     train_ids, distilled.pairs, raw, pairs,
                                                     progress, sizes)
    if sizes is not None:     # the trunk cache is on the GPU now: the step gets what is left
        sizes = memory_plan(model_dir, recipe, dev, dtype, loaded=True)
        trunk.head_chunk, trunk.rows = sizes.head_chunk, sizes.rows
    distill = kl[0]
    val = ([corpus.train.messages[m] for m in val_ids],
           ([h["prompt"] for h, _ in val_pairs], [b["prompt"] for _, b in val_pairs]))
    if begun is None:
        pm, names, router, figures = _supervised(corpus, (items, neutral, kl, safety, trunk),
                                                 recipe, (enc, val, encoder, train_ids),
                                                 distilled, (sits, feats, targets), progress)
        figures.update({
            "validation_messages": val_ids, "validation_safety": [h["id"] for h, _ in val_pairs],
            "base_replies": distilled.report, "raw_continuations": sum(
                not it.seq.tag.startswith(ARITH_TAG) for it in kl[1]),
            "arith_continuations": sum(it.seq.tag.startswith(ARITH_TAG) for it in kl[1]),
            "safety_refusals": len(safety[0]), "safety_twins": len(safety[1])})
    else:
        pm, names = _peft_model(trunk, recipe, len(corpus.poles))
        bank_into_peft(begun[0], pm, names)
        router, figures = begun[0].router, continued_figures(*begun)
    if recipe.route_pref_steps:
        figures["routed_preference"] = _routed_pref(
            trunk, pm, names, router, corpus, distill, distilled.pairs, (sits, feats),
            (enc, encoder, train_ids), recipe, progress)
    bank = _assemble(pm, names, corpus.poles, model_dir, peft_dir)
    bank.router = router
    return bank, {
        **figures,
        "served": {"weights": formats, "quantize": recipe.quantize,
                   "round_activations": recipe.round_activations and dev.type == "cpu",
                   "device": dev.type, "dtype": dtype},
        "memory": sizes.as_dict() if sizes else None}


def memory_plan(model_dir: str, recipe: Recipe, dev: torch.device, dtype: str,
                loaded: bool = False):
    """memory.py's plan on a GPU (memory.gpu_plan); None on the CPU, whose sizes stay the
    recipe's."""
    if dev.type != "cuda":
        return None
    return gpu_plan(model_dir, recipe, dev, DTYPES[dtype].itemsize, loaded)


def _supervised(corpus, data, recipe: Recipe, val, distilled, routing, progress: bool):
    """The experts (with their preference stage), the router and the joint stage: (the peft
    model, its adapter names, the router, their figures)."""
    items, neutral, kl, safety, trunk = data
    pm, names, logs, chosen, prefs = _train_experts(corpus, items, neutral, kl, safety, trunk,
                                                    recipe, val, progress)
    sits, feats, targets = routing
    router, router_report = fit_router(feats, targets, recipe, len(trunk.inner.layers))
    joint = None
    if recipe.joint_steps:
        router, joint = _joint(trunk, pm, names, router, corpus, items, kl[0], distilled.pairs,
                               routing, recipe, progress)
    return pm, names, router, {
        "router": router_report, "final_loss": {p: log[-1] for p, log in logs.items()},
        "early_stopping": chosen, "preference": prefs, "joint": joint}


def _train_experts(corpus, items, neutral, kl, safety, trunk: Trunk, recipe: Recipe, val,
                   progress: bool):
    """One peft adapter per pole (named e0.. in bank order) on the trunk's top layers, each
    early-stopped on the validation messages, then through the preference stage (if any).
    kl: (the base model's chat replies, its raw continuations) for the KL term; safety: (the
    refusals, the same after the look-alikes) for the safety terms."""
    from tqdm.auto import tqdm

    from pf_engine.train.select import Validator
    enc, (val_texts, val_safety), encoder, mids = val
    pm, names = _peft_model(trunk, recipe, len(corpus.poles))
    logs, chosen, prefs = {}, {}, {}
    for k, pole in enumerate(corpus.poles):
        pm.set_adapter(names[k])
        params = [p for p in pm.parameters() if p.requires_grad]
        keep = [it for q in corpus.poles if trait_of(q) != trait_of(pole) for it in items[q]]
        pools = Pools(items[pole], items[opposite(pole)], keep + neutral, *kl, *safety)
        clf = trait_classifier(corpus, pole, mids)
        select = (Validator(trunk.model, enc, val_texts, encoder, clf, pole,
                            val_safety if val_safety[0] else None) if val_texts else None)
        with tqdm(total=recipe.steps, desc=f"expert {pole}", disable=not progress) as bar:
            logs[pole], chosen[pole] = train_expert(trunk, params, pools, recipe, recipe.seed + k,
                                                    progress=bar, select=select)
        if recipe.pref_steps:
            msgs = [corpus.train.messages[m] for m in mids[:recipe.pref_messages]]
            with tqdm(total=1, desc=f"preference {pole}", disable=not progress) as bar:
                prefs[pole] = preference_stage(trunk, params, enc, msgs, encoder, clf, pole,
                                               kl[0], recipe, recipe.seed + k, select,
                                               chosen[pole], raw=kl[1], safety=safety)
                bar.update(1)
    return pm, names, logs, chosen, prefs


def _peft_model(trunk: Trunk, recipe: Recipe, n: int):
    """(the peft model on the trunk's model with n LoRA adapters e0..e{n-1} on its top layers,
    their names), seeded by the recipe."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",
                        target_modules=[HF_MODULE_NAMES[m].split(".")[-1]
                                        for m in recipe.modules],
                        layers_to_transform=list(range(trunk.first, len(trunk.inner.layers))))
    names = [f"e{k}" for k in range(n)]
    torch.manual_seed(recipe.seed)
    pm = get_peft_model(trunk.model, config, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, config)
    return pm, names


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


def _joint(trunk, pm, names, router, corpus, items, distill, pairs, data, recipe: Recipe,
           progress: bool):
    """The joint stage (joint.py) on the router's situations, each with the base model's kept
    reply to it where there is one."""
    from tqdm.auto import tqdm

    from pf_engine.train.joint import Example, joint_stage
    sits, feats, targets = data
    by_prompt = {q: it for (q, _), it in zip(pairs, distill)}
    examples = [Example(feats[i, router.layer], targets[i], by_prompt.get(s["text"]))
                for i, s in enumerate(sits)]
    with tqdm(total=recipe.joint_steps, desc="joint", disable=not progress) as bar:
        return joint_stage(trunk, pm, names, router, examples, items, corpus.poles, distill,
                           recipe, recipe.seed, progress=bar)


def _routed_pref(trunk, pm, names, router, corpus, distill, pairs, data, ctx, recipe: Recipe,
                 progress: bool) -> dict:
    """The routed preference stage (routed_pref.py) on the router's situations, each with the
    base model's kept reply to it where there is one."""
    from tqdm.auto import tqdm

    from pf_engine.train.routed_pref import routed_preference_stage
    sits, feats = data
    enc, encoder, mids = ctx
    by_prompt = {q: it for (q, _), it in zip(pairs, distill)}
    clfs = {t: trait_classifier(corpus, t + "+", mids) for t in TRAITS}
    with tqdm(total=recipe.route_pref_steps, desc="routed preference",
              disable=not progress) as bar:
        return routed_preference_stage(trunk, pm, names, router, sits, feats[:, router.layer],
                                       [by_prompt.get(s["text"]) for s in sits], enc, encoder,
                                       clfs, recipe, recipe.seed, progress=bar)
