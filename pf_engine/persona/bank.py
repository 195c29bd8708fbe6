"""AdapterBank: the persona experts of one base model, stacked per layer and module, in one file.

For layer l and module m (q, k, v, o, gate, up, down), the n experts that target m are stacked
in bank order (ascending expert index):

    A_cat = [A_e1; A_e2; ...]      [R_m, d_in]      R_m = r_e1 + r_e2 + ...
    B_cat = [B_e1  B_e2  ...]      [d_out, R_m]

Tiny example: experts 0 (r=2) and 2 (r=3) target "q", expert 1 does not.  Then
``lora(l, "q").layout`` (pf_kernels.RankLayout) has experts (0, 2), offsets (0, 2, 5),
col_expert [0, 0, 2, 2, 2], and the runtime expands gates g [T, K] to
G_exp = g[:, col_expert] * scalings[col_expert] [T, 5].
An expert whose PEFT folder adapts m only in some layers (``layers_to_transform``) gets zero
blocks in the other layers: its delta there is exactly zero.  A (layer, module) whose stacked
A_cat or B_cat is zero for every expert is dropped when a bank is built or loaded (``trim``;
the shipped ``bigfive`` adapts layers 18-29 only): ``lora`` returns None there, the model
attaches nothing, and the layer runs the base product alone.  The file lists the layers kept
(bank_file.py).

The file (bank_file.py: format, reading, checks) and the import of PEFT folders
(peft_import.py) are beside this module; ``AdapterBank`` is the bank in memory.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch
from pf_kernels.layout import RankLayout

from pf_engine.errors import LoadError, PFError
from pf_engine.model.config import MODULES, ModelConfig
from pf_engine.persona import bank_file, peft_import
from pf_engine.persona.router import SequenceRouter, TokenRouter

BIG_FIVE = ["openness+", "openness-", "conscientiousness+", "conscientiousness-",
            "extraversion+", "extraversion-", "agreeableness+", "agreeableness-",
            "neuroticism+", "neuroticism-"]
SHIPPED_BANKS = {"bigfive": "bigfive.safetensors"}     # name -> file in persona/banks/


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


def trim(weights: dict) -> tuple[dict, int]:
    """``weights`` {(layer, module): (a, b)} without the entries whose a or b is all zeros
    (their delta x A^T B^T is exactly zero for every expert), and how many were dropped; all
    kept when every entry is zero (an untrained bank keeps its shape)."""
    kept = {key: ab for key, ab in weights.items() if all(bool(t.any()) for t in ab)}
    if not kept:
        return dict(weights), 0
    return kept, len(weights) - len(kept)


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




class AdapterBank:
    """K LoRA persona experts for one base model; see the module docstring for the layout.

    Build one with ``load`` (a bank file), ``from_peft`` (PEFT LoRA folders) or ``random``.
    """

    def __init__(self, expert_names, ranks, scalings, fingerprint: dict,
                 module_experts: dict[str, list[int]], weights: dict[tuple[int, str], tuple],
                 router: SequenceRouter | None = None, token_router: TokenRouter | None = None,
                 lora_alpha=None, use_rslora=None, recipe: dict | None = None):
        self.source: str | None = None     # the file it was read from (load), else None
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
        if not weights:
            raise PFError("the bank adapts no module: give its experts target modules")
        self._weights, self.trimmed = trim(weights)   # (layer, module) -> (a, b)
        self.router = router
        self.token_router = token_router
        self.recipe = recipe
        self._digest: str | None = None
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

    def layers(self, module: str | None = None) -> list[int]:
        """The layers where ``module`` (None: any module) has experts stored, increasing."""
        return sorted({l for l, m in self._weights if module is None or m == module})

    def expert_modules(self, k: int) -> list[str]:
        """The modules expert ``k`` adapts."""
        return [m for m, ids in self.module_experts.items() if k in ids]

    @property
    def digest(self) -> str:
        """A hash of what the bank computes (names, ranks, scalings, every tensor's bytes,
        routers' too): the prefix cache's key (prefix_cache.persona_root), so KV computed under
        one bank or expert is never served under another (run-time changes: runtime/banks.py)."""
        if self._digest is None:
            h = hashlib.sha256(repr((self.expert_names, self.ranks, self.scalings)).encode())
            for key, t in self.tensors().items():
                h.update(key.encode())
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def for_model(self, config: ModelConfig,
                  where: str = "adapter bank (in memory)") -> "AdapterBank":
        """A new bank checked against ``config`` exactly as ``load`` checks a file (LoadError
        naming the first mismatch); it shares tensors with this one until cast or moved."""
        return self._from_file(where, self.metadata(), self.tensors(), config)

    def to(self, dtype: torch.dtype | None = None, device=None) -> "AdapterBank":
        """Cast the LoRA weights to ``dtype`` and move everything to ``device``, in place.

        Routers stay float32 (only moved).  Returns self.
        """
        self._weights = {key: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                         for key, (a, b) in self._weights.items()}
        self._digest = None
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
        """The file's header (bank_file.py)."""
        return bank_file.metadata(self)

    def save(self, path, overwrite: bool = False) -> None:
        """Write the bank to ``path`` (a temporary file in the same folder, then a rename).

        An existing ``path`` is refused unless ``overwrite``.  Never leaves a partial file.
        """
        bank_file.write(self, path, overwrite)

    @classmethod
    def load(cls, path, config: ModelConfig | None = None, dtype: torch.dtype | None = None,
             device=None) -> "AdapterBank":
        """Read a bank file (or a shipped bank by name: ``"bigfive"``), checking it against
        ``config`` (the base model) when given.

        Checks: the fingerprint (first mismatching field named with both values), every tensor's
        shape against ``config.module_shape(m)`` and the ranks, the router shapes.  A missing,
        truncated or foreign file raises LoadError naming ``path``.
        """
        path = resolve_bank(path)
        meta, tensors = bank_file.read_file(path)
        bank = cls._from_file(path, meta, tensors, config)
        bank.source = str(path)            # where it was read from (the metrics' bank label)
        if dtype is not None or device is not None:
            bank.to(dtype=dtype, device=device)
        return bank

    @classmethod
    def _from_file(cls, path, meta: dict, tensors: dict, config: ModelConfig | None):
        kw = bank_file.parse(path, meta, tensors, config)
        try:
            return cls(**kw)
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
        return cls(names, **peft_import.stack(base_config, experts, dtype))

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


