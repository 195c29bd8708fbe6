"""Continuous batching (pf_engine/runtime/scheduler.py): requests joining and leaving the running batch
give what each gives alone, slots and gate rows are freed and reused, errors are clear.

Offline, CPU, fp32: one tiny random Llama with a random bank of ten experts (both routers).
"""
import threading

import pytest
import torch

from pf_engine import Engine
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.model.config import ModelConfig
from pf_engine.errors import RequestError
from pf_engine.persona.specs import Personas
from pf_engine.generation.sampling import SamplingParams

TOP2 = {BIG_FIVE[0]: 0.7, BIG_FIVE[3]: 0.3}
DENSE = {n: 0.1 * (i + 1) for i, n in enumerate(BIG_FIVE)}
PERSONAS = [None, TOP2, "auto", "token", DENSE, {BIG_FIVE[6]: 1.2}]


@pytest.fixture(scope="module")
def engines(hf_model_dir):
    folder, _ = hf_model_dir("llama", "sched_base")
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=[4, 8, 2, 8, 4, 2, 8, 4, 2, 8], seed=21, router=True)
    return {be: Engine.from_pretrained(folder, adapters=bank, backend=be, progress=False,
                                       device="cpu", dtype="fp32") for be in ("torch", "naive")}


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Alone:
    """A request run alone without a KV cache or a scheduler: each token is the argmax of
    ``Engine.logits`` over the whole sequence so far (a different code path from the one under
    test).  "auto" routes on the prompt only, as the scheduler does; its gates are then passed
    as explicit weights."""

    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason = token_ids, finish_reason


def alone(eng, ids, persona, n):
    if persona == "auto":
        p = Personas(eng.bank, ["auto"], 1)
        p.route(eng.model, torch.tensor([ids]))
        persona = {name: float(w) for name, w in zip(eng.bank.expert_names, p.rows[0]) if w != 0}
    seq = list(ids)
    for _ in range(n):
        seq.append(int(eng.logits([seq], persona=[persona])[0, -1].argmax()))
        if seq[-1] in eng.eos_ids:
            return Alone(seq[len(ids):], "stop")
    return Alone(seq[len(ids):], "length")


def run_arrivals(sched, specs, arrive, each_step=None) -> list:
    """Submit specs[i] = (ids, persona, max_new) at step arrive[i] and step until all are done
    (``each_step(sched)`` after every step); returns the requests in spec order."""
    reqs, step = {}, 0
    while len(reqs) < len(specs) or sched.pending():
        for i, s in enumerate(arrive):
            if s == step:
                ids, persona, n = specs[i]
                reqs[i] = sched.submit(ids, SamplingParams(max_new_tokens=n), persona)
        sched.step()
        if each_step is not None:
            each_step(sched)
        step += 1
    return [reqs[i] for i in range(len(specs))]


def test_requests_joining_and_leaving_match_each_alone(engines):
    """Arrivals at different steps, different prompt and output lengths, every persona kind,
    fewer slots than requests (some wait): each request's greedy tokens and gates are its own."""
    eng = engines["torch"]
    sched = eng.new_scheduler(slots=3, max_len=64, prefill_budget=4, background=False)
    specs = [(prompt(3 + 2 * i, i), PERSONAS[i % len(PERSONAS)], 4 + 3 * (i % 3)) for i in range(8)]
    arrive = [0, 0, 1, 2, 2, 5, 7, 7]                       # the step each request is submitted at
    def at_most_three(sched):
        assert len(sched.running) <= 3
    reqs = run_arrivals(sched, specs, arrive, at_most_three)
    for i, (ids, persona, n) in enumerate(specs):
        got = reqs[i].result()
        want = alone(eng, ids, persona, n)
        assert got.token_ids == want.token_ids, (i, persona)
        assert got.finish_reason == want.finish_reason
        want = eng.generate([ids], max_new_tokens=n, persona=[persona])[0]     # the gates used
        assert got.token_ids == want.token_ids
        assert (got.gates is None) == (want.gates is None)
        if want.gates is not None:
            assert got.gates["kind"] == want.gates["kind"]
            for k, w in want.gates["weights"].items():
                assert abs(got.gates["weights"][k] - w) <= 1e-4, (i, k)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_static_decode_equals_dynamic(engines, backend):
    """The capturable decode step (static shapes: batch and column buckets, padding rows, all
    experts read) gives the dynamic step's tokens and gates, with requests joining and leaving
    and every persona kind; its device-side lengths track the host's."""
    eng = engines[backend]
    specs = [(prompt(3 + 2 * i, 50 + i), PERSONAS[i % len(PERSONAS)], 3 + 2 * (i % 4)) for i in range(7)]
    arrive = [0, 0, 1, 3, 3, 4, 6]
    out = {}
    for mode in ("dynamic", "static"):
        sched = eng.new_scheduler(slots=5, max_len=64, prefill_budget=6, background=False, decode=mode)

        def lengths_on_device(sched):
            if sched.static is not None:
                n = len(sched.running)
                assert sched.static.lengths[:n].tolist() == [r.length for r in sched.running]
        out[mode] = [r.result() for r in run_arrivals(sched, specs, arrive, lengths_on_device)]
    for i, (d, s) in enumerate(zip(out["dynamic"], out["static"])):
        assert s.token_ids == d.token_ids, i
        if d.gates is not None:
            for k, w in d.gates["weights"].items():
                assert abs(s.gates["weights"][k] - w) <= 1e-4, (i, k)
    with pytest.raises(RequestError, match="decode='fast': expected dynamic, static or graphs"):
        eng.new_scheduler(decode="fast")


def test_naive_backend_through_the_scheduler(engines):
    eng = engines["naive"]
    sched = eng.new_scheduler(slots=2, max_len=48, background=False)
    reqs = [sched.submit(prompt(5 + i, 40 + i), SamplingParams(max_new_tokens=5), p)
            for i, p in enumerate([TOP2, None, "token"])]
    for r, p in zip(reqs, [TOP2, None, "token"]):
        assert r.result().token_ids == alone(engines["torch"], r.ids, p, 5).token_ids


def test_cancel_frees_the_slot_and_slots_are_reused(engines):
    eng = engines["torch"]
    sched = eng.new_scheduler(slots=2, max_len=64, background=False)
    a = sched.submit(prompt(6, 1), SamplingParams(max_new_tokens=30), TOP2)
    b = sched.submit(prompt(4, 2), SamplingParams(max_new_tokens=30), DENSE)
    c = sched.submit(prompt(5, 3), SamplingParams(max_new_tokens=6), "token")
    sched.step()
    assert [r.slot for r in sched.running] == [0, 1] and list(sched.waiting) == [c]
    a.cancel()
    sched.step()                      # a leaves, b moves to slot 0, c is admitted into slot 1
    assert a.result().finish_reason == "cancelled" and a.slot == -1
    assert sched.running[0] is b and b.slot == 0 and c.slot == 1
    assert torch.equal(sched.runner.gates[0], b.personas.rows[0]) and not sched.runner.token_rows[0]
    assert sched.runner.token_rows[1]                       # c's row: token routing
    out_c = c.result()
    assert out_c.token_ids == alone(eng, c.ids, "token", 6).token_ids
    b.cancel()
    out_b = b.result()
    assert out_b.finish_reason == "cancelled" and 0 < len(out_b.token_ids) < 30
    assert not sched.pending() and sched.running == []


def test_many_short_requests_leak_nothing(engines):
    eng = engines["torch"]
    sched = eng.new_scheduler(slots=4, max_len=32, background=False)
    shapes = (sched.runner.cache.k.shape, sched.runner.gates.shape)
    reqs = [sched.submit(prompt(2 + i % 5, i), SamplingParams(max_new_tokens=1 + i % 2),
                         PERSONAS[i % len(PERSONAS)]) for i in range(1000)]
    while sched.pending():
        sched.step()
    assert all(r.done and r.slot == -1 for r in reqs)
    assert not sched.waiting and not sched.running
    assert (sched.runner.cache.k.shape, sched.runner.gates.shape) == shapes
    for i, r in enumerate(reqs):                     # its budget, or an EOS before it
        assert len(r.tokens) == 1 + i % 2 or (r.finish_reason == "stop" and r.tokens[-1] in eng.eos_ids)


def test_a_request_larger_than_a_slot_is_refused(engines):
    eng = engines["torch"]
    sched = eng.new_scheduler(slots=2, max_len=16, background=False)
    with pytest.raises(RequestError, match=r"needs 21 cache columns; a slot holds 16"):
        sched.submit(prompt(11, 0), SamplingParams(max_new_tokens=10))
    assert not sched.pending()
    with pytest.raises(RequestError, match="unknown expert 'nobody'"):
        sched.submit(prompt(3, 0), SamplingParams(max_new_tokens=2), {"nobody": 1.0})
    assert not sched.pending()


def test_a_long_prompt_is_prefilled_a_budget_per_step_while_others_decode(engines):
    """prefill_budget bounds the prompt tokens per step: a 19-token prompt arriving beside a
    decoding request takes five steps of at most 4 tokens, and the decoding request gets one
    token in every one of them; both still equal their runs alone."""
    eng = engines["torch"]
    sched = eng.new_scheduler(slots=2, max_len=64, prefill_budget=4, background=False)
    a = sched.submit(prompt(3, 5), SamplingParams(max_new_tokens=12), DENSE)
    sched.step()                                     # a's prompt fits one budget: it decodes
    assert sched.decoding == 1 and len(a.tokens) == 2
    b = sched.submit(prompt(19, 6), SamplingParams(max_new_tokens=3), "auto")
    seen = []
    while not b.tokens:
        before = len(a.tokens)
        sched.step()
        seen.append(b.length)
        assert len(a.tokens) == before + 1           # a is never stalled by b's prompt
    assert seen == [4, 8, 12, 16, 20] and sched.decoding == 2    # 19 prompt + its first decode
    assert a.result().token_ids == alone(eng, a.ids, DENSE, 12).token_ids
    assert b.result().token_ids == alone(eng, b.ids, "auto", 3).token_ids
    with pytest.raises(RequestError, match=r"prefill_budget=0: expected an integer >= 1"):
        eng.new_scheduler(prefill_budget=0)


def test_pool_sized_from_a_memory_budget(engines):
    """kv_cache_gb gives as many slots of max_len columns as fit; too small a budget, or more
    slots than it holds, is one clear error."""
    eng = engines["torch"]
    cfg = eng.config
    per = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 32 * cfg.head_dim * 4   # fp32
    sched = eng.new_scheduler(max_len=32, kv_cache_gb=3.5 * per / 2 ** 30, background=False)
    assert sched.slots == 3 and sched.runner.cache.k.numel() * 4 * 2 == 3 * per
    with pytest.raises(RequestError, match=r"kv_cache_gb=.*: one slot of 32 columns needs"):
        eng.new_scheduler(max_len=32, kv_cache_gb=0.5 * per / 2 ** 30)
    with pytest.raises(RequestError, match=r"slots=4: 4 slots of 32 columns need"):
        eng.new_scheduler(slots=4, max_len=32, kv_cache_gb=3.5 * per / 2 ** 30)
    with pytest.raises(RequestError, match=r"kv_cache_gb=-1: expected a number > 0"):
        eng.new_scheduler(kv_cache_gb=-1)


def test_submit_in_the_background(engines):
    """Engine.submit returns at once; the background thread produces tokens; iteration and
    result() agree with generate; requests from several threads."""
    eng = engines["torch"]
    eng.new_scheduler(slots=3)                   # a background one (the tests above drove steps)
    outs = {}

    def client(i):
        req = eng.submit(prompt(4 + i, 100 + i), max_new_tokens=5, persona=PERSONAS[i])
        toks = list(req)
        outs[i] = (toks, req.result())
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outs) == 4
    for i in range(4):
        toks, out = outs[i]
        assert toks == out.token_ids == alone(eng, prompt(4 + i, 100 + i), PERSONAS[i], 5).token_ids
    with pytest.raises(RequestError, match="one prompt"):
        eng.submit(["a", "b"])


def test_triton_kernels_through_the_scheduler(engines, hf_model_dir, monkeypatch):
    """The kernel path (Triton's CPU interpreter) under continuous batching equals torch's."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch_eng = engines["torch"]
    eng = Engine.from_pretrained(torch_eng.folder, adapters=torch_eng.bank, backend="triton",
                                 progress=False, device="cpu", dtype="fp32")
    assert eng.backend.name == "triton"
    got, want = {}, {}
    for e, out in ((eng, got), (torch_eng, want)):
        sched = e.new_scheduler(slots=2, max_len=48, background=False)
        reqs = [sched.submit(prompt(4 + i, 70 + i), SamplingParams(max_new_tokens=4), p)
                for i, p in enumerate([TOP2, "token", None])]
        for i, r in enumerate(reqs):
            out[i] = r.result().token_ids
    assert got == want


def test_asyncio_clients(engines):
    """``async for`` and ``await`` on requests from one event loop, run concurrently by the
    background scheduler: the same tokens as the blocking forms; cancel from a coroutine."""
    import asyncio
    eng = engines["torch"]
    eng.new_scheduler(slots=2)

    async def main():
        async def one(i):
            req = eng.submit(prompt(5 + i, 200 + i), max_new_tokens=4 + i, persona=PERSONAS[i])
            toks = [t async for t in req]
            return toks, await req
        outs = await asyncio.gather(*(one(i) for i in range(3)))
        long = eng.submit(prompt(6, 300), max_new_tokens=200)
        async for _ in long:
            with eng.scheduler().lock:             # between two steps: nothing comes after this
                seen = list(long.tokens)
                long.cancel()
            break
        return outs, seen, await long
    outs, seen, cancelled = asyncio.run(asyncio.wait_for(main(), 120))
    for i, (toks, out) in enumerate(outs):
        assert toks == out.token_ids == alone(eng, prompt(5 + i, 200 + i), PERSONAS[i], 4 + i).token_ids
    assert cancelled.token_ids == seen
    # (unless it had finished first: under load the loop can wake after the request ended, at
    # its 200th token or at an EOS the random model drew)
    assert cancelled.finish_reason == "cancelled" or (cancelled.finish_reason == "stop" or len(seen) == 200)

    sched = eng.new_scheduler(slots=1, background=False)
    req = sched.submit(prompt(3, 1), SamplingParams(max_new_tokens=2))
    with pytest.raises(RequestError, match="need a background scheduler"):
        asyncio.run(req.aresult())
    req.cancel()
    sched.step()


def test_kernel_metadata_is_built_once_per_forward(engines, monkeypatch):
    """Equal expert subsets share one RankLayout, built at attach (no forward builds one), and
    the triton backend builds its routing metadata once per forward and subset (not per layer
    call)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import pf_kernels
    torch_eng = engines["torch"]
    eng = Engine.from_pretrained(torch_eng.folder, adapters=torch_eng.bank, backend="triton",
                                 progress=False, device="cpu", dtype="fp32")
    calls = {"layout": 0, "meta": 0}
    layout_init, from_layout = pf_kernels.RankLayout.__init__, pf_kernels.LoRAMeta.from_layout

    def count_layout(*a, **k):
        calls["layout"] += 1
        return layout_init(*a, **k)

    def count_meta(*a, **k):
        calls["meta"] += 1
        return from_layout(*a, **k)
    monkeypatch.setattr(pf_kernels.RankLayout, "__init__", count_layout)
    monkeypatch.setattr(pf_kernels.LoRAMeta, "from_layout", count_meta)
    parts = [p for blk in eng.model.blocks for lin in blk.linears for p in lin.parts]
    subsets = {id(p.layout) for p in parts}
    assert len(parts) > len(subsets)                 # layers share subsets: the test can tell
    assert len({(p.layout.experts, p.layout.offsets, p.layout.host_scalings) for p in parts}) == len(subsets)
    ids = [prompt(6, 1)]
    want = torch_eng.logits(ids, persona=DENSE)
    for i in range(2):
        got = eng.logits(ids, persona=DENSE)
        assert calls == {"layout": 0, "meta": len(subsets) * (i + 1)}
    assert (got - want).abs().max() <= 1e-4


def test_a_failed_graph_capture_falls_back_to_dynamic_decoding(engines):
    """If capturing a step fails, the scheduler warns once and decodes dynamically: the requests
    in flight lose nothing (here capture is forced on a CPU, where it must fail)."""
    eng = engines["torch"]
    sched = eng.new_scheduler(slots=2, max_len=48, background=False, decode="static")
    sched.static.graphs = True
    reqs = [sched.submit(prompt(5 + i, 90 + i), SamplingParams(max_new_tokens=5), p)
            for i, p in enumerate([TOP2, "token"])]
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        sched.step()
    assert sched.static is None
    for r, p in zip(reqs, [TOP2, "token"]):
        assert r.result().token_ids == alone(eng, r.ids, p, 5).token_ids


class CaptureProbe:
    """Records the ops inside a step that a CUDA graph capture refuses or bakes in: a read of a
    device value on the host (item/tolist: _local_scalar_dense; bool(t): is_nonzero, which
    reaches _local_scalar_dense below the dispatcher, unseen), a data-dependent shape
    (nonzero, masked_select) and a tensor made from host data (lift_fresh: torch.tensor(...)),
    which on CUDA is a host-to-device copy.  On CPU none of these fail, so the probe is what lets
    this test fail here."""
    FORBIDDEN = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
                 "aten.lift_fresh", "aten.item")

    def __init__(self):
        import traceback
        from torch.utils._python_dispatch import TorchDispatchMode
        hits = self.hits = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func).startswith(CaptureProbe.FORBIDDEN):
                    hits.setdefault(str(func), "".join(traceback.format_stack(limit=6)[:-1]))
                return func(*args, **(kwargs or {}))
        self.mode = Mode


def triton_engine(hf_model_dir, monkeypatch):
    """The engines fixture's model and bank on the triton backend, its kernels in Triton's CPU
    interpreter (read at each launch: pf_kernels/_triton_kernels.py); skips without triton."""
    from test_kernels import HAVE_TRITON, interpreter_problem
    if not HAVE_TRITON or interpreter_problem():
        pytest.skip(interpreter_problem() or "triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    folder, _ = hf_model_dir("llama", "sched_base")
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=[4, 8, 2, 8, 4, 2, 8, 4, 2, 8], seed=21, router=True)
    return Engine.from_pretrained(folder, adapters=bank, backend="triton", progress=False, device="cpu",
                                  dtype="fp32")


@pytest.mark.parametrize("backend", ["torch", "naive", "triton"])
def test_static_step_is_capturable(engines, backend, monkeypatch, hf_model_dir):
    """The step a CUDA graph captures (StaticDecode._step) reads nothing back to the host and
    copies nothing from it, with every persona kind in the batch: such an op fails the capture
    on a GPU (or is baked into the graph), which CPU tests would not otherwise see.  The triton
    backend's launchers run in the interpreter here (issue 33: the probe covered torch and naive)."""
    from pf_engine.runtime import static_decode
    eng = triton_engine(hf_model_dir, monkeypatch) if backend == "triton" else engines[backend]
    probe = CaptureProbe()
    step = static_decode.StaticDecode._step

    def probed(self, *key):
        with probe.mode():
            return step(self, *key)
    monkeypatch.setattr(static_decode.StaticDecode, "_step", probed)
    specs = [(prompt(3 + i, 70 + i), PERSONAS[i % len(PERSONAS)], 4) for i in range(6)]
    sched = eng.new_scheduler(slots=8, max_len=64, prefill_budget=64, background=False, decode="static")
    run_arrivals(sched, specs, [0] * len(specs))
    assert not probe.hits, "\n\n".join(f"{k} at\n{v}" for k, v in probe.hits.items())
