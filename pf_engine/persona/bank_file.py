"""The adapter bank's file: how an AdapterBank (bank.py) is written, read and checked.

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
               layers          {"q": [18, ..., 29], ...}         the layers each module is
                               stored for, only where some are not (a trimmed bank: bank.py);
                               absent: every layer
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

``write`` never leaves a partial file; ``read_file`` and ``parse`` check everything (against the
base model's config when given) and raise one LoadError naming the file and the first problem.
"""
from __future__ import annotations

import json
import os
import uuid

from pf_engine.errors import LoadError, PFError
from pf_engine.model.checks import (fail, is_int, is_number, need_dict, need_int, need_list,
                                    need_str, one_line)
from pf_engine.model.config import MODULES, ModelConfig
from pf_engine.persona.router import SequenceRouter, TokenRouter

FORMAT_VERSION = 1
FINGERPRINT_FIELDS = ("architecture", "hidden_size", "num_hidden_layers", "vocab_size")


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def metadata(bank) -> dict[str, str]:
    """The header of ``bank``'s file: every value a JSON string."""
    meta = {
        "format": "pt",
        "pf_bank_format": str(FORMAT_VERSION),
        "expert_names": json.dumps(bank.expert_names),
        "ranks": json.dumps(bank.ranks),
        "scalings": json.dumps(bank.scalings),
        "modules": json.dumps({m: [bank.expert_names[k] for k in ids]
                               for m, ids in bank.module_experts.items()}),
        "target_modules": json.dumps(bank.target_modules),
        "fingerprint": json.dumps(bank.fingerprint),
    }
    layers = {m: bank.layers(m) for m in bank.module_experts}
    if any(len(ls) < bank.num_layers for ls in layers.values()):
        meta["layers"] = json.dumps(layers)
    if bank.lora_alpha is not None:
        meta["lora_alpha"] = json.dumps(bank.lora_alpha)
    if bank.use_rslora is not None:
        meta["use_rslora"] = json.dumps(bank.use_rslora)
    router = {}
    if bank.router is not None:
        router["sequence"] = bank.router.config()
    if bank.token_router is not None:
        router["token"] = bank.token_router.config()
    if router:
        meta["router"] = json.dumps(router)
    if bank.recipe is not None:
        meta["recipe"] = json.dumps(bank.recipe)
    return meta


def write(bank, path, overwrite: bool = False) -> None:
    """Write ``bank`` to ``path`` (a temporary file in the same folder, then a rename).

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
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in bank.tensors().items()}
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata(bank))
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise PFError(f"cannot write {path}: {e}") from None
        raise


def read_file(path: str) -> tuple[dict, dict]:
    """(metadata, tensors) of the safetensors file ``path``, or a LoadError."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise LoadError(f"no adapter bank at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:    # SafetensorError, OSError, ...: unreadable or truncated
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"cannot read adapter bank {path}: not a complete safetensors file "
                        f"({msg})") from None


def parse(path, meta: dict, tensors: dict, config: ModelConfig | None) -> dict:
    """The AdapterBank constructor's arguments from a file's ``meta`` and ``tensors``, each
    checked (against ``config``, the base model, when given): LoadError naming the first
    problem."""
    m = _read_meta(path, meta)
    names, fingerprint = m["names"], m["fingerprint"]
    if config is not None:
        model_fp = config.fingerprint()
        for field in FINGERPRINT_FIELDS:
            if fingerprint[field] != model_fp[field]:
                raise LoadError(f"adapter bank {path} was built for another model: "
                                f"{field} is {fingerprint[field]!r} in the bank, "
                                f"{model_fp[field]!r} in the model")
    module_experts = _module_experts(path, m["modules"], names)
    seen: set[str] = set()
    weights = _weights(path, tensors, module_experts, m["ranks"], fingerprint, config, seen,
                       m["layers"])
    routers = _routers(path, tensors, m["router"], len(names), fingerprint, seen)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise LoadError(f"{path}: unexpected tensor {extra[0]}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if not weights:
        raise LoadError(f"{path}: the bank adapts no module")
    recipe = m["recipe"]
    return dict(expert_names=names, ranks=m["ranks"], scalings=m["scalings"],
                fingerprint=fingerprint, module_experts=module_experts, weights=weights,
                lora_alpha=m["alphas"], use_rslora=m["rslora"],
                recipe=recipe if isinstance(recipe, dict) else None, **routers)


def _read_meta(path, meta: dict) -> dict:
    """The header's values, decoded and checked by type and range."""
    if "pf_bank_format" not in meta:
        raise LoadError(f"{path} is not an adapter bank (no pf_bank_format metadata)")
    if meta["pf_bank_format"] != str(FORMAT_VERSION):
        raise LoadError(f"{path}: bank format {meta['pf_bank_format']!r}, this engine reads "
                        f"format {FORMAT_VERSION}")
    try:
        m = dict(names=json.loads(meta["expert_names"]), ranks=json.loads(meta["ranks"]),
                 scalings=json.loads(meta["scalings"]), modules=json.loads(meta["modules"]),
                 fingerprint=json.loads(meta["fingerprint"]),
                 router=json.loads(meta.get("router", "{}")),
                 alphas=json.loads(meta["lora_alpha"]) if "lora_alpha" in meta else None,
                 rslora=json.loads(meta["use_rslora"]) if "use_rslora" in meta else None,
                 recipe=json.loads(meta["recipe"]) if "recipe" in meta else None,
                 layers=json.loads(meta["layers"]) if "layers" in meta else None)
    except (KeyError, ValueError) as e:
        raise LoadError(f"{path}: bad or missing bank metadata ({one_line(e)})") from None
    _check_meta(path, m["names"], m["ranks"], m["scalings"], m["modules"], m["fingerprint"],
                m["router"], m["alphas"], m["rslora"])
    _check_layers(path, m["layers"], m["modules"], int(m["fingerprint"]["num_hidden_layers"]))
    return m


def _check_layers(path, layers, modules: dict, L: int) -> None:
    """The optional ``layers`` header: per module of ``modules``, increasing layers in [0, L)."""
    if layers is None:
        return
    need_dict(layers, f"{path}: bank metadata layers", err=LoadError)
    for m, ls in layers.items():
        if m not in modules:
            raise LoadError(f"{path}: bank metadata layers names module {m!r}, which no expert "
                            f"adapts (expected some of {', '.join(modules)})")
        need_list(ls, f"{path}: bank metadata layers[{m!r}]", lambda v: is_int(v) and 0 <= v < L,
                  f"layer indices in [0, {L})", err=LoadError)
        if sorted(set(ls)) != ls:
            fail(LoadError, f"{path}: bank metadata layers[{m!r}]", ls, "increasing layers")


def _check_meta(path, names, ranks, scalings, modules, fingerprint, router_cfg, alphas, rslora):
    """Every metadata value the loader reads, by type and range (LoadError naming the first)."""
    def where(key):
        return f"{path}: bank metadata {key}"
    need_list(names, where("expert_names"), lambda n: isinstance(n, str) and n != "",
              "non-empty strings", err=LoadError)
    K = len(names)
    if K == 0 or len(set(names)) != K:
        fail(LoadError, where("expert_names"), names, "one or more distinct names")
    need_list(ranks, where("ranks"), lambda r: is_int(r) and r > 0, "integers >= 1", K,
              err=LoadError)
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



def _module_experts(path, modules: dict, names: list[str]) -> dict[str, list[int]]:
    """{module: the expert ids covering it}, from the header's expert names per module."""
    index = {n: k for k, n in enumerate(names)}
    out = {}
    for m, experts in modules.items():
        if m not in MODULES:
            raise LoadError(f"{path}: unknown module {m!r}; expected one of "
                            f"{', '.join(MODULES)}")
        bad = [e for e in experts if e not in index]
        if bad:
            raise LoadError(f"{path}: module {m} lists unknown experts {bad}")
        if len(set(experts)) != len(experts):
            raise LoadError(f"{path}: module {m} lists an expert twice: {experts}")
        out[m] = [index[e] for e in experts]
    return out


def _weights(path, tensors: dict, module_experts: dict, ranks: list[int], fingerprint: dict,
             config: ModelConfig | None, seen: set, layers: dict | None = None) -> dict:
    """{(layer, module): (A_cat, B_cat)} for the layers stored (``layers[m]``, default all),
    every shape checked (against the model's projections when ``config`` is given, else the
    hidden size and the same shape in every layer); the tensor names read are added to
    ``seen``."""
    L, d = int(fingerprint["num_hidden_layers"]), int(fingerprint["hidden_size"])
    weights = {}
    for m, ids in module_experts.items():
        if not ids:
            continue
        R = sum(ranks[k] for k in ids)
        if config is not None:
            d_out, d_in = config.module_shape(m)
            known = "the model's"
        else:       # without the model: the hidden size side, and the same shape every layer
            l0 = (layers or {}).get(m, [0])[0] if (layers or {}).get(m, [0]) else 0
            a0, b0 = tensors.get(f"layers.{l0}.{m}.a"), tensors.get(f"layers.{l0}.{m}.b")
            d_out = d if m in ("o", "down") else (b0.shape[0] if b0 is not None else -1)
            d_in = d if m not in ("o", "down") else (a0.shape[-1] if a0 is not None else -1)
            known = "the bank's"
        for l in (layers or {}).get(m, range(L)):
            ka, kb = f"layers.{l}.{m}.a", f"layers.{l}.{m}.b"
            if ka not in tensors or kb not in tensors:
                raise LoadError(f"{path}: tensor {ka if ka not in tensors else kb} is missing")
            a, b = tensors[ka], tensors[kb]
            for key, t, want in ((ka, a, (R, d_in)), (kb, b, (d_out, R))):
                if tuple(t.shape) != want:
                    why = (f"{known} {m} projection is d_out={d_out}, d_in={d_in}, and the "
                           f"ranks of its experts add up to {R}")
                    raise LoadError(f"adapter bank {path} does not fit: {key} ({m}) has "
                                    f"shape {fmt_shape(t.shape)}, expected "
                                    f"{fmt_shape(want)} ({why})")
            weights[(l, m)] = (a, b)
            seen.update((ka, kb))
    return weights


def _routers(path, tensors: dict, router_cfg: dict, K: int, fingerprint: dict, seen: set) -> dict:
    """{"router": SequenceRouter or None, "token_router": TokenRouter or None} from the file."""
    L, d = int(fingerprint["num_hidden_layers"]), int(fingerprint["hidden_size"])
    out = {"router": None, "token_router": None}
    if "sequence" in router_cfg:
        out["router"] = SequenceRouter.from_tensors(tensors, router_cfg["sequence"], K, d, L,
                                                    where=path)
    if "token" in router_cfg:
        out["token_router"] = TokenRouter.from_tensors(tensors, router_cfg["token"], K, d, L,
                                                       where=path)
    for r in out.values():
        if r is not None:
            seen.update(r.tensors())
    return out
