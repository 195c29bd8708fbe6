"""AdapterBank: the persona experts of one base model, stacked per layer and module, in one file.

For layer l and module m (q, k, v, o, gate, up, down), the n experts that target m are stacked
in bank order (ascending expert index):

    A_cat = [A_e1; A_e2; ...]      [R_m, d_in]      R_m = r_e1 + r_e2 + ...
    B_cat = [B_e1  B_e2  ...]      [d_out, R_m]

Tiny example: experts 0 (r=2) and 2 (r=3) target "q", expert 1 does not.  Then
``lora(l, "q").layout`` (pf_kernels.RankLayout) has experts (0, 2), offsets (0, 2, 5),
col_expert [0, 0, 2, 2, 2], and the runtime expands gates g [T, K] to G_exp = g[:, col_expert] * scalings[col_expert] [T, 5].
An expert whose PEFT folder adapts m only in some layers (``layers_to_transform``) gets zero
blocks in the other layers: its delta there is exactly zero.

File format (safetensors, format version 1):

    tensors    layers.{l}.{m}.a  [R_m, d_in]     layers.{l}.{m}.b  [d_out, R_m]
               router.seq.*, router.tok.{l}.*    (router.py; float32)
    metadata   (every value a JSON string)
               pf_bank_format  "1"
               expert_names    ["openness+", ...]                K names
               ranks           [16, ...]                         r_k
               scalings        [2.0, ...]                        alpha/r (rsLoRA: alpha/sqrt(r))
               lora_alpha      [32, ...]   use_rslora [false, ...]       (informative)
               modules         {"q": ["openness+", ...], ...}   experts covering each module
               target_modules  ["q", "k", ...]                   modules any expert covers
               fingerprint     {"architecture", "hidden_size", "num_hidden_layers", "vocab_size"}
               router          {"sequence": {...}, "token": {...}}   only when routers are present;
                               sequence: {"layer", "temperature", "top_k", "hidden", "none",
                               "strength"} where none true means router.seq.w2/b2 carry one
                               more output row (last), the share of "no persona": the gates
                               then sum to the strength 1 - p_none instead of 1, or with the
                               optional strength {"scale": S, "slope": a, "centre": c} to
                               S * sigmoid(a * (logit(1 - p_none) - c)) (router.SequenceRouter)
               recipe          {...}   how pf-train made the bank (data hash, seeds, versions,
                                       commit); only for trained banks, informative
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass

import torch
from pf_kernels.layout import RankLayout

from pf_engine.model.checks import fail, is_int, is_number, need_dict, need_int, need_list, need_str, one_line
from pf_engine.model.config import HF_MODULE_NAMES, MODULES, ModelConfig
from pf_engine.errors import LoadError, PFError
from pf_engine.persona.router import SequenceRouter, TokenRouter

FORMAT_VERSION = 1
BIG_FIVE = ["openness+", "openness-", "conscientiousness+", "conscientiousness-",
            "extraversion+", "extraversion-", "agreeableness+", "agreeableness-",
            "neuroticism+", "neuroticism-"]
FINGERPRINT_FIELDS = ("architecture", "hidden_size", "num_hidden_layers", "vocab_size")
_HF_TO_SHORT = {hf.split(".")[-1]: m for m, hf in HF_MODULE_NAMES.items()}    # "q_proj" -> "q"
SHIPPED_BANKS = {"bigfive": "bigfive.safetensors"}     # name -> file in pf_engine/banks/
_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
                       r"\.lora_(A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class LoraWeights:
    """The stacked experts of one (layer, module): a [R_m, d_in], b [d_out, R_m] in the bank's
    dtype on its device, and their ``layout`` (pf_kernels.RankLayout: the bank id, rank rows and
    scaling of each block; shared by every layer with the same experts for the module)."""
    a: torch.Tensor
    b: torch.Tensor
    layout: RankLayout

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    # The layout's fields, read through it.
    expert_ids = property(lambda self: self.layout.expert_ids)        # [n] int64
    rank_offsets = property(lambda self: self.layout.rank_offsets)    # [n+1] int32
    col_expert = property(lambda self: self.layout.col_expert)        # [R_m] int64
    col_scaling = property(lambda self: self.layout.col_scaling)      # [R_m] fp32


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or name != name.strip() or \
            any(c in name for c in ",={}") or name.lower() == "auto":
        raise PFError(f"bad expert name {name!r}: expected a non-empty name without spaces around "
                      "it, ',', '=', braces, and not 'auto'")
    return name


def resolve_bank(spec) -> str:
    """A bank path from ``spec``: an existing file as it is, or a shipped bank's name.

    Shipped banks (``SHIPPED_BANKS``): ``"bigfive"``, the ten Big Five experts and the situation
    router trained by pf-train for the bundled SmolLM2-135M-Instruct.  A path always wins over a
    name, so a local file called ``bigfive`` is still read as a file.
    """
    path = os.fspath(spec)
    if os.path.exists(path) or path not in SHIPPED_BANKS:
        if not os.path.exists(path):
            raise LoadError(f"no adapter bank at {path} (expected a bank file or a shipped bank "
                            f"name: {', '.join(SHIPPED_BANKS)})")
        return path
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "banks",
                           SHIPPED_BANKS[path])
    if not os.path.isfile(shipped):
        raise LoadError(f"the shipped bank {path!r} is missing from this install ({shipped}); "
                        "reinstall pf-engine or pass a bank file")
    return shipped


def _check_meta(path, names, ranks, scalings, modules, fingerprint, router_cfg, alphas, rslora):
    """Every metadata value the loader reads, by type and range (LoadError naming the first)."""
    def where(key):
        return f"{path}: bank metadata {key}"
    need_list(names, where("expert_names"), lambda n: isinstance(n, str) and n != "",
              "non-empty strings", err=LoadError)
    K = len(names)
    if K == 0 or len(set(names)) != K:
        fail(LoadError, where("expert_names"), names, "one or more distinct names")
    need_list(ranks, where("ranks"), lambda r: is_int(r) and r > 0, "integers >= 1", K, err=LoadError)
    need_list(scalings, where("scalings"), is_number, "finite numbers", K, err=LoadError)
    need_dict(modules, where("modules"), err=LoadError)
    for m, experts in modules.items():
        need_list(experts, where(f"modules[{m!r}]"), lambda e: isinstance(e, str), "expert names",
                  err=LoadError)
    need_dict(fingerprint, where("fingerprint"), err=LoadError)
    missing = [f for f in FINGERPRINT_FIELDS if f not in fingerprint]
    if missing:
        raise LoadError(f"{path}: fingerprint lacks {', '.join(missing)}")
    need_str(fingerprint["architecture"], where("fingerprint.architecture"), err=LoadError)
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        need_int(fingerprint[field], where(f"fingerprint.{field}"), lo=1, err=LoadError)
    need_dict(router_cfg, where("router"), err=LoadError)
    for kind in ("sequence", "token"):
        if kind in router_cfg:
            need_dict(router_cfg[kind], where(f"router.{kind}"), err=LoadError)
    if alphas is not None:
        need_list(alphas, where("lora_alpha"), is_number, "finite numbers", K, err=LoadError)
    if rslora is not None:
        need_list(rslora, where("use_rslora"), lambda b: isinstance(b, bool), "true/false", K,
                  err=LoadError)


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class AdapterBank:
    """K LoRA persona experts for one base model; see the module docstring for the layout.

    Build one with ``load`` (a bank file), ``from_peft`` (PEFT LoRA folders) or ``random``.
    """

    def __init__(self, expert_names, ranks, scalings, fingerprint: dict,
                 module_experts: dict[str, list[int]], weights: dict[tuple[int, str], tuple],
                 router: SequenceRouter | None = None, token_router: TokenRouter | None = None,
                 lora_alpha=None, use_rslora=None, recipe: dict | None = None):
        self.expert_names = [_check_name(n) for n in expert_names]
        if len(set(self.expert_names)) != len(self.expert_names):
            raise PFError(f"expert names are not unique: {self.expert_names}")
        self.ranks = [int(r) for r in ranks]
        self.scalings = [float(s) for s in scalings]
        K = len(self.expert_names)
        if K == 0 or len(self.ranks) != K or len(self.scalings) != K:
            raise PFError(f"a bank needs K >= 1 experts with one rank and one scaling each; got "
                          f"{K} names, {len(self.ranks)} ranks, {len(self.scalings)} scalings")
        if any(r < 1 for r in self.ranks) or not all(math.isfinite(s) for s in self.scalings):
            raise PFError(f"bad ranks {self.ranks} or scalings {self.scalings}")
        self.lora_alpha = list(lora_alpha) if lora_alpha is not None else None
        self.use_rslora = list(use_rslora) if use_rslora is not None else None
        self.fingerprint = dict(fingerprint)
        self.module_experts = {m: sorted(module_experts[m]) for m in MODULES
                               if module_experts.get(m)}
        self.target_modules = list(self.module_experts)
        self._weights = dict(weights)               # (layer, module) -> (a, b)
        if not self._weights:
            raise PFError("the bank adapts no module: give its experts target modules")
        self.router = router
        self.token_router = token_router
        self.recipe = recipe
        self._build_index()

    # Layout ---------------------------------------------------------------------------------
    num_experts = property(lambda self: len(self.expert_names))
    num_layers = property(lambda self: int(self.fingerprint["num_hidden_layers"]))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._weights.values()))[0].dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._weights.values()))[0].device

    def _build_index(self):
        """Per module the RankLayout of its experts (shared by all layers), then the views."""
        self._index = {m: RankLayout.interned(ids, [self.ranks[k] for k in ids],
                                              [self.scalings[k] for k in ids], self.device)
                       for m, ids in self.module_experts.items()}
        self._lora = {(l, m): LoraWeights(a, b, self._index[m])
                      for (l, m), (a, b) in self._weights.items()}

    def lora(self, layer: int, module: str) -> LoraWeights | None:
        """The stacked experts of ``module`` in ``layer``; None when no expert targets it."""
        return self._lora.get((layer, module))

    def expert_modules(self, k: int) -> list[str]:
        """The modules expert ``k`` adapts."""
        return [m for m, ids in self.module_experts.items() if k in ids]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def for_model(self, config: ModelConfig, where: str = "adapter bank (in memory)") -> "AdapterBank":
        """A new bank checked against ``config`` exactly as ``load`` checks a file (LoadError
        naming the first mismatch); it shares tensors with this one until cast or moved."""
        return self._from_file(where, self.metadata(), self.tensors(), config)

    def to(self, dtype: torch.dtype | None = None, device=None) -> "AdapterBank":
        """Cast the LoRA weights to ``dtype`` and move everything to ``device``, in place.

        Routers stay float32 (only moved).  Returns self.
        """
        self._weights = {key: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                         for key, (a, b) in self._weights.items()}
        if device is not None:
            for r in (self.router, self.token_router):
                if r is not None:
                    r.to(device)
        self._build_index()
        return self

    def require_router(self, kind: str = "sequence"):
        """The bank's ``"sequence"`` or ``"token"`` router, or a PFError saying what to do."""
        if kind in ("sequence", "seq", "auto"):
            r, what = self.router, "sequence"
        elif kind in ("token", "tok"):
            r, what = self.token_router, "token"
        else:
            raise PFError(f"unknown router kind {kind!r}; expected 'sequence' or 'token'")
        if r is None:
            example = ",".join(f"{n}={w}" for n, w in zip(self.expert_names[:2], (0.8, 0.4)))
            raise PFError(f"this bank has no {what} router: use explicit persona weights, e.g. "
                          f"--persona {example}")
        return r

    def __repr__(self):
        return (f"AdapterBank({self.num_experts} experts {self.expert_names}, ranks {self.ranks}, "
                f"modules {self.target_modules}, {self.nbytes / 2**20:.1f} MiB, "
                f"router={'sequence' if self.router else 'none'}"
                f"{'+token' if self.token_router else ''})")

    # File form --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for (l, m), (a, b) in sorted(self._weights.items(),
                                     key=lambda kv: (kv[0][0], MODULES.index(kv[0][1]))):
            out[f"layers.{l}.{m}.a"], out[f"layers.{l}.{m}.b"] = a, b
        for r in (self.router, self.token_router):
            if r is not None:
                out.update(r.tensors())
        return out

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": "pt",
            "pf_bank_format": str(FORMAT_VERSION),
            "expert_names": json.dumps(self.expert_names),
            "ranks": json.dumps(self.ranks),
            "scalings": json.dumps(self.scalings),
            "modules": json.dumps({m: [self.expert_names[k] for k in ids]
                                   for m, ids in self.module_experts.items()}),
            "target_modules": json.dumps(self.target_modules),
            "fingerprint": json.dumps(self.fingerprint),
        }
        if self.lora_alpha is not None:
            meta["lora_alpha"] = json.dumps(self.lora_alpha)
        if self.use_rslora is not None:
            meta["use_rslora"] = json.dumps(self.use_rslora)
        router = {}
        if self.router is not None:
            router["sequence"] = self.router.config()
        if self.token_router is not None:
            router["token"] = self.token_router.config()
        if router:
            meta["router"] = json.dumps(router)
        if self.recipe is not None:
            meta["recipe"] = json.dumps(self.recipe)
        return meta

    def save(self, path, overwrite: bool = False) -> None:
        """Write the bank to ``path`` (a temporary file in the same folder, then a rename).

        An existing ``path`` is refused unless ``overwrite``.  Never leaves a partial file.
        """
        from safetensors.torch import save_file
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.exists(path) and not overwrite:
            raise PFError(f"{path} already exists: pass overwrite=True (pf-bank: --overwrite) "
                          "to replace it")
        if not os.path.isdir(folder):
            raise PFError(f"cannot write {path}: folder {folder} does not exist")
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in self.tensors().items()}
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            save_file(tensors, tmp, metadata=self.metadata())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise PFError(f"cannot write {path}: {e}") from None
            raise

    @classmethod
    def load(cls, path, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
             device=None) -> "AdapterBank":
        """Read a bank file (or a shipped bank by name: ``"bigfive"``), checking it against
        ``config`` (the base model) when given.

        Checks: the fingerprint (first mismatching field named with both values), every tensor's
        shape against ``config.module_shape(m)`` and the ranks, the router shapes.  A missing,
        truncated or foreign file raises LoadError naming ``path``.
        """
        from safetensors import safe_open
        path = resolve_bank(path)
        if not os.path.isfile(path):
            raise LoadError(f"no adapter bank at {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:    # SafetensorError, OSError, ...: unreadable or truncated
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoadError(f"cannot read adapter bank {path}: not a complete safetensors file "
                            f"({msg})") from None
        bank = cls._from_file(path, meta, tensors, config)
        if dtype is not None or device is not None:
            bank.to(dtype=dtype, device=device)
        return bank

    @classmethod
    def _from_file(cls, path, meta: dict, tensors: dict, config: ModelConfig | None):
        if "pf_bank_format" not in meta:
            raise LoadError(f"{path} is not an adapter bank (no pf_bank_format metadata)")
        if meta["pf_bank_format"] != str(FORMAT_VERSION):
            raise LoadError(f"{path}: bank format {meta['pf_bank_format']!r}, this engine reads "
                            f"format {FORMAT_VERSION}")
        try:
            names = json.loads(meta["expert_names"])
            ranks = json.loads(meta["ranks"])
            scalings = json.loads(meta["scalings"])
            modules = json.loads(meta["modules"])
            fingerprint = json.loads(meta["fingerprint"])
            router_cfg = json.loads(meta.get("router", "{}"))
            alphas = json.loads(meta["lora_alpha"]) if "lora_alpha" in meta else None
            rslora = json.loads(meta["use_rslora"]) if "use_rslora" in meta else None
            recipe = json.loads(meta["recipe"]) if "recipe" in meta else None
        except (KeyError, ValueError) as e:
            raise LoadError(f"{path}: bad or missing bank metadata ({one_line(e)})") from None
        _check_meta(path, names, ranks, scalings, modules, fingerprint, router_cfg, alphas, rslora)
        if config is not None:
            model_fp = config.fingerprint()
            for field in FINGERPRINT_FIELDS:
                if fingerprint[field] != model_fp[field]:
                    raise LoadError(f"adapter bank {path} was built for another model: "
                                    f"{field} is {fingerprint[field]!r} in the bank, "
                                    f"{model_fp[field]!r} in the model")
        index = {n: k for k, n in enumerate(names)}
        module_experts = {}
        for m, experts in modules.items():
            if m not in MODULES:
                raise LoadError(f"{path}: unknown module {m!r}; expected one of "
                                f"{', '.join(MODULES)}")
            bad = [e for e in experts if e not in index]
            if bad:
                raise LoadError(f"{path}: module {m} lists unknown experts {bad}")
            if len(set(experts)) != len(experts):
                raise LoadError(f"{path}: module {m} lists an expert twice: {experts}")
            module_experts[m] = [index[e] for e in experts]
        L, d = int(fingerprint["num_hidden_layers"]), int(fingerprint["hidden_size"])
        weights, seen = {}, set()
        for m, ids in module_experts.items():
            if not ids:
                continue
            R = sum(ranks[k] for k in ids)
            if config is not None:
                d_out, d_in = config.module_shape(m)
                known = "the model's"
            else:       # without the model: the hidden size side, and the same shape every layer
                a0, b0 = tensors.get(f"layers.0.{m}.a"), tensors.get(f"layers.0.{m}.b")
                d_out = d if m in ("o", "down") else (b0.shape[0] if b0 is not None else -1)
                d_in = d if m not in ("o", "down") else (a0.shape[-1] if a0 is not None else -1)
                known = "the bank's"
            for l in range(L):
                ka, kb = f"layers.{l}.{m}.a", f"layers.{l}.{m}.b"
                if ka not in tensors or kb not in tensors:
                    raise LoadError(f"{path}: tensor {ka if ka not in tensors else kb} is missing")
                a, b = tensors[ka], tensors[kb]
                for key, t, want in ((ka, a, (R, d_in)), (kb, b, (d_out, R))):
                    if tuple(t.shape) != want:
                        why = (f"{known} {m} projection is d_out={d_out}, d_in={d_in}, and the "
                               f"ranks of its experts add up to {R}")
                        raise LoadError(f"adapter bank {path} does not fit: {key} ({m}) has "
                                        f"shape {_fmt_shape(t.shape)}, expected "
                                        f"{_fmt_shape(want)} ({why})")
                weights[(l, m)] = (a, b)
                seen.update((ka, kb))
        router = token_router = None
        if "sequence" in router_cfg:
            router = SequenceRouter.from_tensors(tensors, router_cfg["sequence"], len(names), d,
                                                 L, where=path)
            seen.update(router.tensors())
        if "token" in router_cfg:
            token_router = TokenRouter.from_tensors(tensors, router_cfg["token"], len(names), d,
                                                    L, where=path)
            seen.update(token_router.tensors())
        extra = sorted(set(tensors) - seen)
        if extra:
            raise LoadError(f"{path}: unexpected tensor {extra[0]}"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        if not weights:
            raise LoadError(f"{path}: the bank adapts no module")
        try:
            return cls(names, ranks, scalings, fingerprint, module_experts, weights,
                       router=router, token_router=token_router, lora_alpha=alphas,
                       use_rslora=rslora, recipe=recipe if isinstance(recipe, dict) else None)
        except PFError as e:
            raise LoadError(f"{path}: {e}") from None

    # Builders ---------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, base_config: ModelConfig, experts: dict, dtype: torch.dtype | None = None
                  ) -> "AdapterBank":
        """Stack PEFT LoRA folders ``{expert name: folder}`` (in this order) into a bank.

        Each folder holds adapter_config.json and adapter_model.safetensors as PEFT's
        ``save_pretrained`` writes them.  Supported: LoRA (``peft_type`` LORA) of any rank r and
        ``lora_alpha``, ``use_rslora``, ``target_modules`` among q/k/v/o/gate/up/down_proj (a
        list, a regex string or "all-linear"), ``layers_to_transform``.  Refused with a LoadError:
        other PEFT types, DoRA, rank_pattern / alpha_pattern, biases, modules_to_save, other
        target modules, ``.bin`` weights.  ``dtype``: the bank's dtype (default: the adapters').
        """
        if not experts:
            raise PFError("from_peft needs at least one expert {name: PEFT folder}")
        names = [_check_name(n) for n in experts]
        read = [_read_peft(n, os.fspath(d), base_config) for n, d in experts.items()]
        if dtype is None:       # the adapters' own dtype, float32 when they differ
            dts = {t.dtype for _, _, _, w in read for ab in w.values() for t in ab}
            dtype = dts.pop() if len(dts) == 1 else torch.float32
        L = base_config.num_hidden_layers
        module_experts = {m: [k for k, (_, _, _, w) in enumerate(read)
                              if any(mm == m for (_, mm) in w)] for m in MODULES}
        weights = {}
        for m, ids in module_experts.items():
            if not ids:
                continue
            d_out, d_in = base_config.module_shape(m)
            for l in range(L):
                a_parts, b_parts = [], []
                for k in ids:
                    r = read[k][0]
                    a, b = read[k][3].get((l, m), (torch.zeros(r, d_in), torch.zeros(d_out, r)))
                    a_parts.append(a.to(dtype))
                    b_parts.append(b.to(dtype))
                weights[(l, m)] = (torch.cat(a_parts, 0).contiguous(),
                                   torch.cat(b_parts, 1).contiguous())
        ranks = [r for r, _, _, _ in read]
        alphas = [a for _, a, _, _ in read]
        rslora = [s for _, _, s, _ in read]
        scalings = [a / math.sqrt(r) if s else a / r for r, a, s, _ in read]
        return cls(names, ranks, scalings, base_config.fingerprint(), module_experts, weights,
                   lora_alpha=alphas, use_rslora=rslora)

    @classmethod
    def random(cls, base_config: ModelConfig, expert_names=None, rank=16, modules=MODULES,
               alpha=None, seed: int = 0, router=False, dtype=torch.float32) -> "AdapterBank":
        """A seeded random bank for tests and demos.

        ``expert_names`` default BIG_FIVE; ``rank`` one int or one per expert; ``modules`` a list
        of module names for every expert, or a dict {expert: modules}; ``alpha`` default 2 * rank
        (scaling 2).  A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming-uniform, as PEFT), B ~ N(0, 0.05
        / sqrt(r)) (nonzero, so each expert changes the output a little).  ``router``: True gives
        a random sequence router and token router, or name one: "sequence" / "token".
        """
        names = list(BIG_FIVE if expert_names is None else expert_names)
        K = len(names)
        ranks = [int(rank)] * K if isinstance(rank, int) else [int(r) for r in rank]
        if len(ranks) != K:
            raise PFError(f"{len(ranks)} ranks for {K} experts")
        if isinstance(modules, str):
            modules = modules.split(",")
        per_expert = ([list(modules.get(n, ())) for n in names] if isinstance(modules, dict)
                      else [list(modules)] * K)
        for ms in per_expert:
            for m in ms:
                if m not in MODULES:
                    raise PFError(f"unknown module {m!r}; expected some of {', '.join(MODULES)}")
        alphas = [2 * r if alpha is None else alpha for r in ranks]
        scalings = [a / r for a, r in zip(alphas, ranks)]
        module_experts = {m: [k for k in range(K) if m in per_expert[k]] for m in MODULES}
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for l in range(base_config.num_hidden_layers):
            for m in MODULES:
                ids = module_experts[m]
                if not ids:
                    continue
                d_out, d_in = base_config.module_shape(m)
                a = [(torch.rand(ranks[k], d_in, generator=g) * 2 - 1) / math.sqrt(d_in)
                     for k in ids]
                b = [torch.randn(d_out, ranks[k], generator=g) * (0.05 / math.sqrt(ranks[k]))
                     for k in ids]
                weights[(l, m)] = (torch.cat(a, 0).to(dtype), torch.cat(b, 1).to(dtype))
        seq = tok = None
        if router not in (False, None):
            if router not in (True, "sequence", "token", "both"):
                raise PFError(f"router must be True, False, 'sequence' or 'token', got {router!r}")
            d = base_config.hidden_size
            if router in (True, "both", "sequence"):
                seq = SequenceRouter.random(K, d, seed=seed + 1)
            if router in (True, "both", "token"):
                tok = TokenRouter.random(K, d, base_config.num_hidden_layers, seed=seed + 2)
        return cls(names, ranks, scalings, base_config.fingerprint(), module_experts, weights,
                   router=seq, token_router=tok, lora_alpha=alphas, use_rslora=[False] * K)


# PEFT import --------------------------------------------------------------------------------------
_SUPPORTED_TARGETS = ", ".join(f"{m}_proj" for m in _HF_TO_SHORT.values())


def _read_peft(name: str, folder: str, config: ModelConfig):
    """One PEFT LoRA folder -> (r, lora_alpha, use_rslora, {(layer, module): (A, B)})."""
    from safetensors.torch import load_file
    where = f"expert {name!r} ({folder})"

    def fail(msg):
        raise LoadError(f"{where}: {msg}")

    if not os.path.isdir(folder):
        fail("no such folder")
    cfg_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        fail("no adapter_config.json: not a PEFT adapter folder")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read adapter_config.json ({e})")
    if not isinstance(c, dict):
        fail("adapter_config.json is not a JSON object")
    ptype = str(c.get("peft_type", "")).upper()
    if ptype != "LORA":
        fail(f"peft_type is {c.get('peft_type')!r}; only LoRA adapters (peft_type LORA) can join "
             "a bank")
    if c.get("use_dora"):
        fail("uses DoRA (use_dora=true), which is not supported; train a plain LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            fail(f"{key} is not supported (per-module ranks or alphas): {c[key]!r}")
    if c.get("bias", "none") != "none":
        fail(f"bias={c['bias']!r} is not supported; only bias='none'")
    if c.get("lora_bias"):
        fail("lora_bias=true is not supported")
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters",
                "layer_replication", "alora_invocation_tokens"):
        if c.get(key):
            fail(f"{key} is not supported: {c[key]!r}")
    for key in ("fan_in_fan_out", "use_qalora", "use_bdlora"):
        if c.get(key):
            fail(f"{key}=true is not supported")
    targets = c.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for t in targets:
            short = str(t).split(".")[-1]
            if short not in _HF_TO_SHORT:
                fail(f"targets {t!r}, which the engine cannot adapt; supported target modules: "
                     f"{_SUPPORTED_TARGETS}")
    try:
        r, alpha = c["r"], c["lora_alpha"]
    except KeyError as e:
        fail(f"adapter_config.json lacks {e}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        fail(f"bad rank r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        fail(f"bad lora_alpha={alpha!r}")
    rslora = bool(c.get("use_rslora", False))

    wpath = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(wpath):
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("adapter_model.bin",
                                                                  "adapter_model.pt")):
            fail("has only adapter_model.bin (pickle, which the engine never loads); re-save it "
                 "as safetensors: PeftModel.from_pretrained(base, folder)"
                 ".save_pretrained(folder, safe_serialization=True)")
        fail("no adapter_model.safetensors")
    try:
        sd = load_file(wpath)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        fail(f"cannot read adapter_model.safetensors ({msg})")

    L = config.num_hidden_layers
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key in sorted(sd):
        mt = _PEFT_KEY.search(key)
        if mt is None:
            if "lora_magnitude_vector" in key:
                fail("uses DoRA (lora_magnitude_vector), which is not supported")
            if "lora_embedding" in key or "embed_tokens" in key:
                fail(f"adapts the token embeddings ({key}), which the engine cannot adapt")
            fail(f"tensor {key} adapts a module the engine cannot adapt; supported target "
                 f"modules: {_SUPPORTED_TARGETS}")
        l, m, ab = int(mt.group(1)), mt.group(2), mt.group(3)
        if l >= L:
            fail(f"tensor {key} is for layer {l}, but the base model has {L} layers")
        parts.setdefault((l, m), {})[ab] = sd[key]
    if not parts:
        fail("adapter_model.safetensors holds no LoRA weights")
    out = {}
    for (l, m), p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            fail(f"layer {l} {m}_proj has lora_{'A' if 'A' in p else 'B'} but not "
                 f"lora_{'B' if 'A' in p else 'A'}")
        d_out, d_in = config.module_shape(m)
        for ab, want in (("A", (r, d_in)), ("B", (d_out, r))):
            if tuple(p[ab].shape) != want:
                fail(f"layer {l} {m}_proj lora_{ab} has shape {_fmt_shape(p[ab].shape)}, expected "
                     f"{_fmt_shape(want)} (rank r={r}; the base model's {m} projection is "
                     f"d_out={d_out}, d_in={d_in})")
        out[(l, m)] = (p["A"], p["B"])
    return r, alpha, rslora, out
