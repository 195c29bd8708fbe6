"""The README's Performance summary: a few headline figures, each computed from one JSON of the
results folder and naming the commit that made it; the full tables are in RESULTS.md."""
from __future__ import annotations

import os

from benchmarks.report.common import load, row


def _at(res: dict) -> str:
    m = res["machine"]
    state = "" if m.get("dirty") == [] else " + uncommitted changes" if m.get("dirty") else ""
    return f"commit {m.get('commit')}{state}"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def end_to_end(gen: dict) -> list[str]:
    """Base decode against transformers and the read floor; the default backend's persona cost."""
    base, hf = row(gen, "pf_engine", "base"), row(gen, "transformers", "base")
    if not base:
        return []
    m, b = gen["machine"], base["decode_ms_per_token"]
    out = [f"- **Decode, bundled SmolLM2-135M-Instruct** ({m['cpu']}, {gen['threads']} threads, "
           f"{gen['dtype']}; {_at(gen)}): base {b:.1f} ms/token"
           + (f", {hf['decode_ms_per_token'] / b:.2f}x faster than transformers" if hf else "")
           + (f", {b / base['floor_ms_per_token']:.2f}x its read floor" if base.get("floor_ms_per_token") else "")
           + "."]
    be = "cpu" if row(gen, "pf_engine", "top2", "cpu") else "torch"
    parts = []
    for cfg in ("top2", "dense"):
        r = row(gen, "pf_engine", cfg, be)
        if r:
            parts.append(f"{cfg} {r['decode_ms_per_token'] / b:.2f}x")
    peft = row(gen, "transformers+peft (cat)", "top2")
    if parts:
        out.append(f"- **Personas mixed in one pass** ({be} backend, ten rank-16 experts, same run): "
                   + ", ".join(parts) + " the base model's ms/token"
                   + (f"; transformers + PEFT top-2: {peft['decode_ms_per_token'] / hf['decode_ms_per_token']:.2f}x "
                      "transformers' base" if peft and hf else "") + ".")
    return out


def cpu_formats(res: dict) -> list[str]:
    """Decode per weight format against llama.cpp on the same file (bench_cpu.json)."""
    rows = {(r["engine"], r["format"], r["persona"]): r for r in res["rows"]}
    parts = []
    for f in ("q4_1", "q8_0", "bf16", "f16", "f32", "q4_k_m"):
        o, t = rows.get(("pf_engine", f, "base")), rows.get(("llama.cpp", f, "base"))
        label = f"{f} (Qwen2.5-Coder-0.5B)" if f == "q4_k_m" else f
        if o and t:
            parts.append(f"{label} {o['decode_ms_per_token']:.1f} vs {t['decode_ms_per_token']:.1f} ms/token "
                         f"({o['decode_ms_per_token'] / t['decode_ms_per_token']:.2f}x)")
        elif o:
            parts.append(f"{label} {o['decode_ms_per_token']:.1f} ms/token")
    if not parts:
        return []
    from benchmarks.bench_cpu import goals
    g = goals(res)
    met = sum(1 for *_, ok in g if ok)
    rss = res["peak_rss_mb"].get("q4_1")
    pre = [f"{f} {rows[('pf_engine', f, 'base')]['prefill_tok_s']:.0f} vs "
           f"{rows[('llama.cpp', f, 'base')]['prefill_tok_s']:.0f}"
           for f in ("q4_1", "q8_0", "bf16", "f16", "f32", "q4_k_m")
           if ("pf_engine", f, "base") in rows and ("llama.cpp", f, "base") in rows]
    plain = res.get("peer_extra_buffers") is False
    return [f"- **CPU decode by weight format, ours vs llama.cpp on the same GGUF** ({res['machine']['cpu']}, "
            f"{res['threads']} threads, our kernels {res.get('isa', '?')}; {_at(res)}): " + ", ".join(parts)
            + ("; prefill tok/s " + ", ".join(pre) if pre else "")
            + ("; llama.cpp without its extra buffer types (its AMX weights crash its decode on this "
               "CPU: benchmarks/llama_peer.py)" if plain else "")
            + (f"; the bundled model in 4-bit peaks at {rss:.0f} MB RSS" if rss else "")
            + f"; {met} of {len(g)} goals of issues 21 and 32 met (table in RESULTS.md)."] + cpu_experts(res)


def perplexity(results_dir: str) -> list[str]:
    """Perplexity of GGUF files in pf_engine and llama.cpp on the same tokens (bench_ppl_*.json)."""
    parts, at = [], None
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("bench_ppl_") and name.endswith(".json"):
            res = load(os.path.join(results_dir, name))
            model = os.path.basename(res["model"]).removesuffix(".gguf")
            parts.append(f"{model} {res['pf_engine']['ppl']:.3f} vs {res['llama_cpp']['ppl']:.3f} "
                         f"({res['ppl_ratio']:.4f}, {res['scored_tokens']} tokens)")
            at = at or f"{res['machine']['cpu']}, {_at(res)}"
    if not parts:
        return []
    return [f"- **Perplexity, ours vs llama.cpp on the same GGUF and tokens** ({at}; ctx 512, Pride and "
            "Prejudice): " + ", ".join(parts) + "."]


def cpu_experts(res: dict) -> list[str]:
    """Persona decode per expert format on the bundled 4-bit model, beside llama.cpp's LoRAs."""
    ms = {(r["persona"], r.get("bank"), r.get("experts")): r["decode_ms_per_token"]
          for r in res["rows"] if r["format"] == "q4_1" and r["engine"] == "pf_engine"}
    peer = {r["persona"]: r["decode_ms_per_token"] for r in res["rows"] if r["engine"] == "llama.cpp"}
    base = ms.get(("base", None, None))
    if base is None or ("top2", "rank16", "q8") not in ms:
        return []
    fmts = [(f, label) for f, label in (("q8", "q8 experts (the default there)"), ("bf16", "bf16"), ("f32", "fp32"))
            if ("top2", "rank16", f) in ms and ("dense10", "rank16", f) in ms]
    line = ("- **Personas on the bundled 4-bit model** (same run; ten rank-16 experts on all seven projections, "
            "ms/token against the base model's): "
            + "; ".join(f"{label} top-2 {ms['top2', 'rank16', f] / base:.2f}x, "
                        f"dense {ms['dense10', 'rank16', f] / base:.2f}x"
                        for f, label in fmts))
    wb = res.get("weight_bytes", {}).get("q4_1")
    eb = {(r["persona"], r.get("bank")): r["expert_bytes"] for r in res["rows"]
          if r.get("experts") == "q8" and "expert_bytes" in r}
    if wb and ("top2", "rank16") in eb and ("dense10", "rank16") in eb:
        line += (f" (q8: the bytes a step reads {1 + eb['top2', 'rank16'] / wb:.2f}x / "
                 f"{1 + eb['dense10', 'rank16'] / wb:.2f}x the base's)")
    if ("top2", "bigfive", "q8") in ms:
        line += f"; the shipped bigfive top-2 {ms['top2', 'bigfive', 'q8'] / base:.2f}x"
    if "2 LoRAs (top2)" in peer and "10 LoRAs (dense10)" in peer:
        line += (f"; llama.cpp with 2 / 10 LoRAs {peer['2 LoRAs (top2)'] / ms['top2', 'rank16', 'q8']:.2f}x / "
                 f"{peer['10 LoRAs (dense10)'] / ms['dense10', 'rank16', 'q8']:.2f}x slower than ours")
    return [line + "."]


def prefix(res: dict) -> list[str]:
    """The prefix cache and structured output (bench_prefix.json)."""
    m, st = res["median"], res["structured"]
    return [f"- **Prefix cache, CPU** ({_at(res)}): a stream of {res['requests']} chat requests on three "
            f"~300-token system prompts, personas mixed: time to first token p50 {m['on']['ttft_p50_s']:.2f} s "
            f"with the cache against {m['off']['ttft_p50_s']:.2f} s without ({res['ttft_p50_ratio']:.2f}x lower; "
            f"goal 3x: {_met(res['ttft_p50_ratio'] >= 3)}), throughput {res['throughput_ratio']:.2f}x; "
            f"structured (JSON schema) decoding costs {st['ratio']:.2f}x free decoding per token "
            f"(goal <= 1.15x: {_met(st['ratio'] <= 1.15)})."]


def tensor_parallel(res: dict) -> list[str]:
    """Two CPU ranks against one (bench_tp.json)."""
    from benchmarks.bench_tp import ONE
    r = res["rows"]
    one, shm = r[ONE], r["2 ranks x 1 thread, shm, head sharded"]
    gloo, solo = r["2 ranks x 1 thread, gloo, head sharded"], r["1 rank x 1 thread"]
    q4 = r["2 ranks x 1 thread, shm, head sharded, q4"]
    return [f"- **Tensor parallelism, CPU** ({_at(res)}): 2 ranks x 1 thread decode at "
            f"{shm['decode_ms_per_token']:.1f} ms/token with shared-memory all-reduces against "
            f"{one['decode_ms_per_token']:.1f} for 1 rank x 2 threads ({shm['decode_vs_baseline']:.2f}x the time; "
            f"1 thread alone: {solo['decode_ms_per_token']:.1f}), {gloo['decode_ms_per_token']:.1f} through gloo "
            f"({gloo['decode_vs_baseline']:.2f}x), {q4['decode_vs_baseline']:.2f}x on 4-bit weights; greedy tokens "
            f"{'equal' if shm['greedy8_equal_baseline'] else 'NOT equal'}; "
            f"{shm['allreduce_bytes_per_decode_step'] / 1e3:.0f} kB of all-reduces per decode step against "
            f"{shm['weight_bytes_rank0_per_decode_step'] / 1e6:.0f} MB of weights read by rank 0."]


def shared(res: dict) -> list[str]:
    """Base decode beside busy processes against quiet (bench_shared.json), ours and transformers'."""
    rows = {(r["engine"], r["config"]): r for r in res.get("summary", [])}
    ours, peer = rows.get(("pf_engine", "base")), rows.get(("transformers", "base"))
    if not ours or ours["two-nice"].get("ratio") is None or ours["one-busy"].get("ratio") is None:
        return []
    two, one = ours["two-nice"]["ratio"], ours["one-busy"]["ratio"]
    out = (f"- **On a shared machine** ({_at(res)}): base decode {two:.2f}x slower beside two background "
           f"busy processes (goal <= 2.5: {_met(two <= 2.5)}), {one:.2f}x beside one busy process "
           f"(goal <= 3: {_met(one <= 3)})")
    if peer and peer["two-nice"].get("ratio") and peer["one-busy"].get("ratio"):
        out += f"; transformers {peer['two-nice']['ratio']:.2f}x and {peer['one-busy']['ratio']:.2f}x"
    return [out + "."]


def prefix_personas(res: dict) -> list[str]:
    """The split prefix cache against off and the persona-keyed one (bench_prefix_personas.json)."""
    m = res["median"]
    return [f"- **One system prompt, many personas** ({_at(res)}): a stream whose persona is drawn "
            f"independently of its system prompt, time to first token p50 "
            f"{m['split']['ttft_p50_s']:.2f} s with the split prefix cache, "
            f"{res['off_over_split']:.2f}x lower than without a cache (goal 2x: "
            f"{_met(res['off_over_split'] >= 2)}) and {res['persona_over_split']:.2f}x lower than "
            f"the persona-keyed cache (goal 1.5x: {_met(res['persona_over_split'] >= 1.5)}); "
            f"greedy replies {'equal' if res['replies_equal'] else '**not equal**'} with the cache "
            "and without"
            + _auto_stream(res.get("auto")) + "."]


def _auto_stream(a: dict | None) -> str:
    """The "auto on every request" stream of bench_prefix_personas, where the JSON has one."""
    if not a:
        return ""
    return (f"; with \"auto\" on every request {a['median']['split']['ttft_p50_s']:.2f} s, "
            f"{a['off_over_split']:.2f}x lower than without a cache and "
            f"{a['pass_over_split']:.2f}x lower than routing by a pass of its own")


def replicas(res: dict) -> list[str]:
    """Replicas on Ray Serve, affinity against round-robin, and a killed replica
    (bench_replicas.json)."""
    by = {r["mode"]: r for r in res.get("rows", [])}
    if "affinity" not in by or "round-robin" not in by:
        return []
    a, rr = by["affinity"], by["round-robin"]
    line = (f"- **Replicas on Ray Serve** ({res['machine']['cpu']}, {res['threads']} threads shared "
            f"by the replicas; {_at(res)}): two replicas routed by persona and system prompt reuse "
            f"{a['hit_rate']:.0%} of the prompt tokens from the prefix cache against "
            f"{rr['hit_rate']:.0%} round-robin ({res['hit_rate_ratio']:.2f}x; goal 1.5x: "
            f"{_met(res['hit_rate_ratio'] >= 1.5)}), time to first token p50 "
            f"{a['ttft_p50_s']:.2f} s against {rr['ttft_p50_s']:.2f} s")
    f = res.get("fault")
    if f:
        rep = f["replaced_after_s"]
        line += (f"; a replica SIGKILLed during a burst of {f['requests']}: {f['answered']} "
                 f"answered, {f['failed']} failed on it, {f['hung']} hung, replaced after "
                 f"{'never' if rep is None else f'{rep:.0f} s'} (goal 30 s: "
                 f"{_met(rep is not None and rep <= 30 and f['hung'] == 0)})")
    return [line + "."]


def deterministic(res: dict) -> list[str]:
    """What deterministic=True costs on fp32 weights (bench_deterministic.json): the range of its
    prefill and decode ratios over the configurations and workloads."""
    rows = res.get("rows") or []
    if not rows:
        return []
    pre = [r["prefill_ratio"] for r in rows]
    dec = [r["decode_ratio"] for r in rows]
    cost = max(1 / min(pre), max(dec)) - 1
    return [f"- **Batch-invariant greedy on fp32 weights** (`deterministic=True`; {res['machine']['cpu']}, "
            f"{res['machine']['torch_threads']} threads; {_at(res)}): prefill {min(pre):.2f}-{max(pre):.2f}x "
            f"the default's tokens/s, decode {min(dec):.2f}-{max(dec):.2f}x its ms/token (on by default "
            f"if at most 10% slower: {_met(cost <= 0.10)}; it is a switch, off by default); a model "
            f"stored as bytes (the bundled 4-bit one) is batch-invariant without it."]


def speculative(res: dict) -> list[str]:
    """Speculative decoding by prompt lookup: the editing stream's speedup, the worst case and
    the equality rows (bench_speculative.json)."""
    rows = res.get("rows") or {}
    if "editing" not in rows or "missed" not in rows:
        return []
    e, m = rows["editing"], rows["missed"]
    same = all(a == b for a, b in (v.split("/") for v in res["equal"].values()))
    return [f"- **Speculative decoding by prompt lookup** ({res['machine']['cpu']}, the bundled "
            f"model, draft {res['draft']}; {_at(res)}): a reply that copies its prompt decodes "
            f"{e['speedup']:.2f}x faster (goal 1.5x: {_met(e['speedup'] >= 1.5)}), every draft "
            f"wrong {m['speedup']:.2f}x (goal >= 0.95x: {_met(m['speedup'] >= 0.95)}); greedy "
            f"tokens {'equal' if same else '**not** equal'} to decoding without drafts for base, "
            f"explicit and auto personas."]


def serving(srv: dict, where: str) -> list[str]:
    goals = srv.get("goals") or []
    if not goals:
        return []
    top = max(goals, key=lambda g: g["rate"])
    return [f"- **Continuous batching, {where}** ({_at(srv)}): at {top['rate']:g} req/s, p99 time to "
            f"first token {top['ttft_p99_ratio']:.1f}x lower than static batching, throughput "
            f"{top['throughput_ratio']:.2f}x (goal 2x: {_met(top['throughput_ratio'] >= 2)})"
            + (f"; a mix of personas costs {top['persona_cost']:.2f}x the base model's throughput"
               if "persona_cost" in top else "") + "."]


def graphs(dec: dict) -> list[str]:
    rows = {(r["batch"], r["mode"]): r["ms_per_step"] for r in dec.get("rows", [])}
    pairs = [(b, rows[(b, "dynamic")] / rows[(b, "graphs")]) for b, mode in rows
             if mode == "graphs" and (b, "dynamic") in rows]
    if not pairs:
        return []
    return [f"- **CUDA-graph decode** ({dec['machine'].get('gpu')}, {_at(dec)}): "
            + ", ".join(f"{x:.1f}x faster than dynamic at B={b}" for b, x in sorted(pairs)) + "."]


def headline(results_dir: str, link: str) -> list[str]:
    """The README block's lines (markdown), ``link`` the path of RESULTS.md from the README."""
    def get(name):
        return load(os.path.join(results_dir, name))
    out = []
    for name, fn in (("bench_generate.json", end_to_end), ("bench_cpu.json", cpu_formats),
                     ("bench_shared.json", shared), ("bench_prefix.json", prefix),
                     ("bench_tp.json", tensor_parallel),
                     ("bench_prefix_personas.json", prefix_personas),
                     ("bench_deterministic.json", deterministic),
                     ("bench_speculative.json", speculative),
                     ("bench_replicas.json", replicas)):
        res = get(name)
        if res:
            out += fn(res)
    out += perplexity(results_dir)
    for name, where in (("bench_serving.json", "CPU"), ("gpu_serving.json", "GPU")):
        res = get(name)
        if res:
            out += serving(res, where)
    dec = get("gpu_decode.json")
    if dec:
        out += graphs(dec)
    return out + ["", f"Every figure above is computed from a JSON in `benchmarks/results/` by "
                  f"`python -m benchmarks.report`; the full tables, their commands and the machines "
                  f"are in [{os.path.basename(link)}]({link}).", ""]
