"""Engine: load a model once, then generate, stream or score.

    eng = Engine.from_pretrained()                 # the bundled SmolLM2-135M-Instruct
    out = eng.generate(["Hello", "Bonjour"], max_new_tokens=32)[0].text

Every generation runs on the continuous-batching scheduler (runtime/scheduler.py): prompts are
prefilled in chunks, every decode step advances all unfinished requests together, and a request
that finishes (EOS, stop string, token budget) leaves the batch and frees its KV slot.  The
backend chosen here (backends.resolve_backend) runs every layer of the model.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Iterator

import torch

from pf_engine.backends import resolve_backend
from pf_engine.backends.cpu.experts import check as check_expert_format
from pf_engine.backends.cpu.experts import describe as expert_formats
from pf_engine.errors import PFError, RequestError
from pf_engine.generation.sampling import SamplingParams, generation_defaults
from pf_engine.generation.scoring import score
from pf_engine.model import bundled
from pf_engine.model import quantize as quantization
from pf_engine.model.config import ModelConfig
from pf_engine.model.decoder import SCRATCH, Decoder, causal_mask
from pf_engine.model.gguf_import import convert_gguf
from pf_engine.model.loading import check_model_path, load_weights
from pf_engine.outputs import GenerationOutput, Stats
from pf_engine.parallel.options import check_parallel
from pf_engine.parallel.runtime import tp_model
from pf_engine.persona.bank import AdapterBank
from pf_engine.runtime import banks
from pf_engine.persona.mix import Mix
from pf_engine.persona.specs import Personas
from pf_engine.runtime.config import SchedulerConfig
from pf_engine.runtime.prefix_cache import PrefixCache
from pf_engine.runtime.prefix_cache import default_gb as default_prefix_cache_gb
from pf_engine.runtime.scheduler import Scheduler
from pf_engine.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise PFError(f"dtype={dtype!r}: expected one of fp32, fp16, bf16")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PFError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PFError(f"device={device!r}: no CUDA GPU is available here")
    if dev.type not in ("cpu", "cuda"):
        raise PFError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_model(model, progress: bool) -> str:
    """None -> the bundled default; a .gguf -> its cached conversion; else an HF folder."""
    if model is None:
        return bundled.default_model_dir(progress=progress)
    model = os.fspath(model)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise PFError(f"model path {model} does not exist")
        st = os.stat(model)
        key = hashlib.sha1(
            f"{os.path.abspath(model)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = os.path.join(bundled.pf_home(), "models",
                           f"{os.path.basename(model)[:-5]}-{key}")
        if not os.path.isfile(os.path.join(out, "config.json")):
            convert_gguf(model, out, overwrite=True, progress=progress)
        return out
    return check_model_path(model)


def gguf_source(model) -> str | None:
    """The GGUF file a model comes from (None: the bundled one; a .gguf path), else None."""
    if model is None:
        return bundled.bundled_gguf_path()
    model = os.fspath(model)
    return model if model.endswith(".gguf") else None


def served_load_args(mode: str | None, gguf: str | None, backend, dtype: torch.dtype) -> tuple:
    """What load_weights reads for a model served with ``mode`` (quantization.check's result)
    on ``backend``: (mode, the GGUF whose 8/4-bit and 16-bit tensors are kept as stored, or
    None: the converted folder's float weights)."""
    keep = gguf is not None and mode is None and backend.quantized and dtype == torch.float32
    return mode, (gguf if keep else None)


class Engine:
    def __init__(self, folder: str, device: torch.device, dtype: torch.dtype, adapters,
                 backend, mode: str | None, gguf: str | None, tensor_parallel: int = 1):
        """Built by ``from_pretrained``, which resolves and checks what this takes: ``folder``,
        the model's HF-layout folder (config, tokenizer, float weights); ``gguf``, the file it
        was converted from, whose 8/4-bit and 16-bit tensors are used as they are where the
        backend runs them; ``backend``, the resolved Backend; ``mode``, quantize as checked
        (model/quantize.py); ``tensor_parallel``: ranks (parallel/runtime.py)."""
        self.folder, self.device, self.dtype = folder, device, dtype
        self.config = ModelConfig.from_file(os.path.join(folder, "config.json"))
        self.backend = backend
        self.load_args = served_load_args(mode, gguf, self.backend, dtype)   # TP workers too
        keep = self.load_args[1] is not None
        self.tensor_parallel = check_parallel(self.config, tensor_parallel, device,
                                              keep or mode not in (None, "f32"))
        weights = load_weights(folder, self.config, dtype, device, *self.load_args)
        self.base_formats = quantization.describe(weights)
        self.bank = None
        if adapters is not None:
            self.bank = adapters.for_model(self.config) if isinstance(adapters, AdapterBank) \
                else AdapterBank.load(os.fspath(adapters), self.config)
            self.bank.to(dtype=dtype, device=device)
        if self.tensor_parallel > 1:
            self.model = tp_model(self, weights)
        else:
            self.model = Decoder(self.config, weights, device, self.backend)
            if self.bank is not None:
                self.model.attach(self.bank)
        self.describe_weights()
        if getattr(backend, "deterministic", False) and not self.batch_invariant:
            raise PFError(f"deterministic=True: the cpu kernel does not run this model's "
                          f"{self.weight_formats} weights; expected fp32 or a quantized format")
        self.tokenizer = Tokenizer.maybe(folder)
        eos = set(self.config.eos_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.stats = Stats()
        self.load_s = 0.0
        self.prefix_cache_gb = default_prefix_cache_gb()
        self._prefix = False  # False: not built yet
        self._generation_defaults: dict[bool, tuple[dict, str]] = {}

    @classmethod
    def from_pretrained(cls, model=None, adapters=None, device=None, dtype=None, backend=None,
                        progress: bool = True, quantize: str | None = None,
                        tensor_parallel: int = 1, expert_format: str | None = None,
                        deterministic: bool = False) -> "Engine":
        """Load a model (None: the bundled SmolLM2-135M-Instruct; an HF folder; a .gguf file).

        device: "cpu" / "cuda" (default: cuda when present); dtype: fp32 / fp16 / bf16 (default
        fp32 on CPU, bf16 on GPU).  adapters: a persona adapter bank (a path, an AdapterBank, or
        a shipped bank's name: "bigfive"), checked against the model.  backend: how the model's
        layers run and experts mix: auto (default: cpu on a CPU where csrc/cpu is built, else
        torch; $PF_BACKEND overrides it), cpu, torch, naive, triton, cuda (backends/).
        quantize: None (a GGUF's own formats on the cpu backend, an HF folder's weights
        as stored), "f32" (everything float), "q8" / "q4" / "bf16" / "f16" (an HF folder
        converted at load): model/quantize.py.
        expert_format: the persona experts' format on the cpu backend: None / "auto" (q8 on an
        8/4-bit model, bf16 on a 16-bit one, f32 on fp32), "f32", "bf16", "q8"
        (backends/cpu/experts.py); converted once at load, the bank file unchanged.
        deterministic: greedy tokens batch-invariant on fp32 weights too (cpu backend: every
        fp32 product the kernel's, at about half torch's prefill throughput; README).  A model
        stored as bytes (the bundled 4-bit one) is batch-invariant either way
        (``Engine.batch_invariant``).
        tensor_parallel: N ranks (CPU): this process and N - 1 worker processes each hold
        1/N of every block's heads and FFN columns, of the LM head's rows and of the persona
        experts, and sum their partial outputs through shared memory (or gloo:
        $PF_TP_ALLREDUCE) (pf_engine/parallel); ``close()`` stops them.  Under torchrun (ranks on
        several hosts, parallel/launch.py) N is the launcher's WORLD_SIZE and only rank 0
        returns: every other rank serves rank 0's calls here and its process then exits.
        """
        if isinstance(tensor_parallel, int) and tensor_parallel > 1:
            from pf_engine.parallel import launch
            env = launch.torchrun_env()
            if env is not None:
                launch.check_world(tensor_parallel, env)
                if env["rank"] > 0:
                    launch.serve_as_worker(tensor_parallel, env, launch.timeout_s())
        t0 = time.perf_counter()
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        gguf = gguf_source(model)
        check_expert_format(expert_format)
        be = resolve_backend(backend, dev, expert_format, deterministic)
        mode = quantization.check(quantize, gguf=gguf is not None, device=dev, dtype=dt,
                                  backend=be)                  # before any conversion runs
        eng = cls(resolve_model(model, progress), dev, dt, adapters, be, mode, gguf,
                  tensor_parallel)
        eng.load_s = time.perf_counter() - t0
        return eng

    @property
    def batch_invariant(self) -> bool:
        """Whether a request's greedy tokens are its own whatever shares its steps (alone, in
        any batch, under any prefill chunking): the cpu backend with every Linear stored as
        bytes, or with ``deterministic=True`` (Backend.batch_invariant)."""
        return self.backend.batch_invariant()

    def generation_defaults(self, chat: bool) -> tuple[dict, str]:
        """The sampling fields pf-generate and pf-serve use where a user gives none, and where
        they come from (``sampling.generation_defaults``: the model's generation config, else a
        chat default for chat and greedy for plain completion).  ``generate`` itself takes
        ``SamplingParams()`` (greedy) unless told otherwise."""
        if chat not in self._generation_defaults:
            self._generation_defaults[chat] = generation_defaults(self.folder, chat)
        d, source = self._generation_defaults[chat]
        return dict(d), source

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is collected)."""
        workers = getattr(self.model, "workers", None)
        if workers is not None:
            workers.close()

    # Prompts ------------------------------------------------------------------------------
    def _encode(self, prompts, chat: bool) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError("prompts: expected a string, a list of strings "
                               "or a list of token-id lists")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise RequestError(f"prompt {i} is empty")
                if self.tokenizer is None:
                    raise RequestError(f"this model ({self.folder}) has no tokenizer.json: "
                                       "pass token ids")
                ids = self.tokenizer.encode(p, chat=chat)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                if chat:
                    raise RequestError("chat=True needs text prompts, not token ids")
                ids = list(p)
            else:
                raise RequestError(f"prompt {i}: expected a string or a list of token ids")
            if not ids:
                raise RequestError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                   f"[0, {self.config.vocab_size})")
            out.append(ids)
        return out

    def _fit_context(self, prompts: list[list[int]], max_new: int, truncate: bool):
        ctx = self.config.max_position_embeddings
        fitted = []
        for i, ids in enumerate(prompts):
            if len(ids) >= ctx:
                if not truncate:
                    raise RequestError(
                        f"prompt {i} has {len(ids)} tokens; the context holds {ctx} "
                        "(pass truncate=True / --truncate to keep its last tokens)")
                ids = ids[-max(1, ctx - max_new):]
            fitted.append(ids)
        return fitted

    # Generation -----------------------------------------------------------------------------
    def _requests(self, prompts, sampling, persona, chat: bool, truncate: bool, kw: dict):
        """Encoded prompts, their SamplingParams (request i seeded with seed + i) and personas
        (a one-row Personas each), all checked before anything runs."""
        params = SamplingParams.merged(sampling, kw)
        ids = self._fit_context(self._encode(prompts, chat), params.max_new_tokens, truncate)
        personas = Personas(self.bank, persona, len(ids))      # checks every spec and the count
        return (ids, [params.for_request(i) for i in range(len(ids))],
                [personas.select([i]) for i in range(len(ids))])

    def _private(self, ids: list[list[int]], per: list[SamplingParams], personas: list):
        """A scheduler of its own for one generate/stream call: a slot per prompt, a pool just
        long enough, every prompt prefilled in the first step (all arrive at once)."""
        ctx = self.config.max_position_embeddings
        need = max(len(p) + q.budget(len(p), ctx) for p, q in zip(ids, per))
        # dynamic decode: capturing graphs for one call would cost more than it saves
        sched = Scheduler(self, SchedulerConfig(len(ids), max(2, need), sum(len(p) for p in ids),
                                                background=False, decode="dynamic"))
        return sched, [sched.submit(p, q, s) for p, q, s in zip(ids, per, personas)]

    def generate(self, prompts, sampling: SamplingParams | None = None, *, persona=None,
                 chat: bool = False, truncate: bool = False, **kw) -> list[GenerationOutput]:
        """Generate for one prompt or a batch; returns one GenerationOutput per prompt.

        prompts: str | list[str] | list[int] | list[list[int]].  sampling: a SamplingParams, and
        / or its fields as keywords (max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
        repetition_penalty=1.0, seed=None, stop=None, logprobs=None; keywords override
        ``sampling``'s).  logprobs=N: each output's ``logprobs`` holds a Logprob per new token
        (generation/scoring.py: the model's log-softmax, before penalty and temperature)
        with the N most
        likely tokens.
        temperature 0 is greedy; request i is seeded with seed + i; stop strings are cut from
        the text.  chat: wrap each text prompt in the tokenizer's chat template as a user
        message.  truncate: keep the last tokens of a prompt longer than the context.

        A static batch is a continuous batch whose requests all arrive at once: the prompts run
        through a scheduler of their own (runtime/scheduler.py), each leaving when it is done.
        """
        ids, per, personas = self._requests(prompts, sampling, persona, chat, truncate, kw)
        sched, reqs = self._private(ids, per, personas)
        sched.run()
        self.stats = sched.stats
        return [r.result() for r in reqs]

    def stream(self, prompt, sampling: SamplingParams | None = None, *, persona=None,
               chat: bool = False, truncate: bool = False, **kw) -> Iterator[str]:
        """Yield the text of one prompt piece by piece as it is generated (arguments as for
        ``generate``)."""
        if self.tokenizer is None:
            raise RequestError(f"this model ({self.folder}) has no tokenizer.json: "
                               "stream needs one")
        _one_prompt(prompt, "stream")
        ids, per, personas = self._requests(prompt, sampling, persona, chat, truncate, kw)
        sched, (req,) = self._private(ids, per, personas)
        yield from req.text()                # each step runs in here
        self.stats = sched.stats

    # Continuous batching --------------------------------------------------------------------
    def describe_weights(self) -> None:
        """weight_formats: the base's formats, and the experts' when a bank is attached."""
        self.weight_formats = self.base_formats
        if self.bank is not None:
            self.weight_formats += f", {expert_formats(self.model)} experts"

    def load_bank(self, adapters) -> None:
        """Replace the bank (a path, a shipped name or an AdapterBank), or load one, between
        requests: a RequestError while any is in flight (runtime/banks.py)."""
        banks.swap(self, banks.checked(self, adapters))

    def unload_bank(self) -> None:
        """Drop the bank (the base model alone from now on), between requests."""
        banks.swap(self, None)

    def load_expert(self, name: str, source) -> None:
        """Add expert ``name`` (a PEFT folder, or a bank file's expert) to the bank, or replace the
        one of that name, between requests (runtime/banks.py)."""
        banks.load_expert(self, name, source)

    def unload_expert(self, name: str) -> None:
        """Remove expert ``name`` from the bank, between requests."""
        banks.unload_expert(self, name)

    def prefix_cache(self):
        """The engine's prefix cache (runtime/prefix_cache.py), shared by its schedulers and
        generate calls: prompt KV blocks reused by later prompts that start the same way under the
        same persona; built on first use with ``prefix_cache_gb`` GiB (None when 0: off).  Under
        tensor parallelism every rank keeps its own heads of each block, ``prefix_cache_gb``
        GiB per process."""
        if self._prefix is False:
            self._prefix = PrefixCache.for_engine(self, self.prefix_cache_gb)
        return self._prefix

    def set_prefix_cache(self, gb: float) -> None:
        """A new, empty prefix cache of ``gb`` GiB (0: off) for the schedulers built after."""
        self._prefix = PrefixCache.for_engine(self, gb)
        self.prefix_cache_gb = gb

    def scheduler(self):
        """The engine's continuous-batching scheduler (scheduler.Scheduler): the current one, or
        a default one built on first use (runtime/config.py: 8 slots, background thread, ...).
        ``new_scheduler`` replaces it."""
        cur = getattr(self, "_scheduler", None)
        return cur if cur is not None else self.new_scheduler()

    def new_scheduler(self, slots: int | None = None, max_len: int | None = None,
                      prefill_budget: int | None = None, background: bool | None = None,
                      kv_cache_gb: float | None = None, decode: str | None = None):
        """Build the engine's scheduler anew with these settings (defaults for the rest,
        runtime/config.py), once the current one is idle, and return it: a new KV pool.
        kv_cache_gb sizes the pool by memory: as many slots of max_len columns as fit.  decode:
        "dynamic", "static" or "graphs" (CUDA graphs, the default on CUDA; see
        runtime/static_decode.py)."""
        cur = getattr(self, "_scheduler", None)
        if cur is not None and cur.pending():
            raise RequestError("the scheduler has requests in flight: wait for them (or cancel "
                               "them) before building another")
        self._scheduler = Scheduler(self, SchedulerConfig.of(
            slots=slots, max_len=max_len, prefill_budget=prefill_budget, background=background,
            kv_cache_gb=kv_cache_gb, decode=decode))
        return self._scheduler

    def submit(self, prompt, sampling: SamplingParams | None = None, *, persona=None,
               chat: bool = False, truncate: bool = False, **kw):
        """Submit one request to the continuous batch and return at once with its handle
        (request.Request): iterate it for token ids, ``.text()`` for text pieces,
        ``.result()`` for the GenerationOutput, ``.cancel()`` to stop it.  Arguments as for
        ``generate``, for one prompt."""
        _one_prompt(prompt, "submit")
        params = SamplingParams.merged(sampling, kw)
        ids = self._fit_context(self._encode(prompt, chat), params.max_new_tokens, truncate)[0]
        return self.scheduler().submit(ids, params, persona)

    @torch.inference_mode()
    def logits(self, token_ids, persona=None) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for token ids [B, T] (a tensor or equal-length lists).

        persona: as for generate (one for all rows or one per row)."""
        try:
            ids = torch.as_tensor(token_ids, dtype=torch.long) \
                if not isinstance(token_ids, torch.Tensor) \
                else token_ids.long()
        except (ValueError, TypeError):
            raise RequestError("token_ids: expected a [B, T] tensor "
                               "or equal-length lists of ints") from None
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise RequestError("token_ids: expected a non-empty [B, T] batch, "
                               f"got shape {list(ids.shape)}")
        B, T = ids.shape
        if T > self.config.max_position_embeddings:
            raise RequestError(f"token_ids has {T} positions; the context holds "
                               f"{self.config.max_position_embeddings}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise RequestError(f"token_ids: ids must lie in [0, {self.config.vocab_size})")
        ids = ids.to(self.device)
        personas = Personas(self.bank, persona, B)
        personas.route(self.model, ids)
        return self.forward_rows(ids, personas)

    def score(self, prompts, persona=None, top_logprobs: int = 0):
        """Score prompts without decoding: per prompt (a list of token ids; any lengths)
        [None, Logprob, ...], token t's logprob given tokens 0..t-1 under the model's
        log-softmax, with its ``top_logprobs`` most likely tokens (generation/scoring.py).
        One batched
        forward (chunked), no KV slot."""
        return score(self, prompts, persona, top_logprobs)

    def forward_rows(self, ids: torch.Tensor, personas: Personas) -> torch.Tensor:
        """Logits [B, T, V] of full sequences ids [B, T] from position 0, without a KV cache;
        ``personas`` already routed (rows filled)."""
        B, T = ids.shape
        mix = None
        if personas.any:
            mix = Mix.for_rows(personas.rows.to(self.device), personas.token_rows.to(self.device),
                               T,
                               self.bank.token_router)
        positions = torch.arange(T, device=self.device).expand(B, T)
        with self.backend.policy.forward(self.device, self.backend.own_threads(B * T)):
            return self.model(ids, positions, SCRATCH, causal_mask(T, self.config.sliding_window,
                                                                   self.device), mix=mix)


def _one_prompt(prompt, what: str) -> None:
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt
                                            and isinstance(prompt[0], int)):
        raise RequestError(f"{what} takes one prompt: a string or a list of token ids")


for _name in ("generate", "stream", "forward_rows"):
    setattr(Engine, _name, torch.inference_mode()(getattr(Engine, _name)))
