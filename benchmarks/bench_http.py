"""The scheduler benchmark's Poisson stream sent over HTTP to pf-serve, against the same stream
submitted in process: what the server adds per request and per token.

    python benchmarks/bench_http.py                  # 24 requests at 1 req/s, bundled model, CPU
    python benchmarks/bench_http.py --requests 8 --rate 4 --model DIR --out results/x.json

The stream is bench_serving's (same prompts, personas none / explicit top-2 / auto, 8-40 new
tokens, EOS ignored).  in-process: ``Engine.submit`` at each arrival (bench_serving's continuous
run).  http: the real ``openai`` client (AsyncOpenAI, one streamed chat completion per request)
against pf-serve on 127.0.0.1 in this process, timed on the client: TTFT = first content chunk -
arrival, TPOT = (last chunk - first chunk) / (tokens - 1), tokens from the usage chunk.
Writes --out (JSON with the machine and commit) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_serving import (header, make_stream, run_continuous,  # noqa: E402
                                      stream_engines, stream_flags, summary)
from benchmarks.common import CpuWatch, busy_warning, command_line, machine_info, write_json  # noqa: E402

MID = "bench"


def run_http(url: str, stream: list[dict]) -> tuple[list[dict], float]:
    import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        t0 = time.perf_counter()

        async def one(s):
            await asyncio.sleep(max(0.0, t0 + s["arrival"] - time.perf_counter()))
            arrival = time.perf_counter()
            model, extra = MID, {}
            if s["persona"] == "auto":
                model = f"{MID}:auto"
            elif s["persona"] is not None:
                extra = {"persona": s["persona"]}
            first, tokens = None, 0
            events = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": s["prompt"]}],
                max_tokens=s["max_new"], temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
            async for ch in events:
                if ch.choices and ch.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
            done = time.perf_counter()
            return {"arrival": arrival, "first": first or done, "done": done, "tokens": tokens}
        recs = await asyncio.gather(*(one(s) for s in stream))
        await client.close()
        return list(recs), t0
    return asyncio.run(main())


def markdown(result: dict) -> str:
    lines = header(result, f"{result['requests']} requests at {result['rate']:g} req/s (Poisson)")
    lines += ["| run | requests/s | tokens/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |",
              "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['run']} | {r['requests'] / r['seconds']:.2f} | {r['throughput_tok_s']:.1f} | "
                     f"{r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p99_s']:.3f} | {1e3 * r['tpot_p50_s']:.1f} | {1e3 * r['tpot_p99_s']:.1f} |")
    o = result["overhead"]
    lines += ["", f"HTTP over in-process: TTFT p50 {o['ttft_p50_ms']:+.1f} ms, TPOT p50 "
              f"{o['tpot_p50_ms']:+.2f} ms per token, throughput x{o['throughput_ratio']:.3f}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stream_flags(ap, "bench_http.json")
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second")
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.requests < 1:
        ap.error(f"--rate {args.rate} / --requests {args.requests}: expected > 0 and >= 1")
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    watch = CpuWatch()
    base, engines = stream_engines(args, [None])                          # the default backend
    eng = engines[None]
    stream = make_stream(args.requests, args.rate, args.min_new, args.max_new, args.seed)
    recs, t0, busy = run_continuous(eng, stream, args.slots, 128)
    runs = [summary("in-process", args.rate, recs, t0, busy)]
    print(f"  in-process: {runs[-1]['throughput_tok_s']:.1f} tok/s", file=sys.stderr)
    eng.new_scheduler(slots=args.slots, prefill_budget=128)                    # a fresh pool
    with ThreadedServer(build_app(eng, MID, max_queue=args.requests)) as srv:
        recs, t0 = run_http(srv.url, stream)
    st = eng.scheduler().stats
    runs.append(summary("http", args.rate, recs, t0, st.prefill_s + st.decode_s))
    print(f"  http: {runs[-1]['throughput_tok_s']:.1f} tok/s", file=sys.stderr)
    inp, http = runs
    overhead = {"ttft_p50_ms": 1e3 * (http["ttft_p50_s"] - inp["ttft_p50_s"]),
                "tpot_p50_ms": 1e3 * (http["tpot_p50_s"] - inp["tpot_p50_s"]),
                "throughput_ratio": http["throughput_tok_s"] / inp["throughput_tok_s"]}
    result = {"benchmark": "bench_http", "command": command_line("python benchmarks/bench_http.py", argv),
              "machine": machine_info(), "device": args.device, "threads": args.threads,
              "model": base.folder, "requests": args.requests, "rate": args.rate, "slots": args.slots,
              "min_new": args.min_new, "max_new": args.max_new, "seed": args.seed,
              "other_cpu_cores": watch.other_cores(), "busy": busy_warning(watch.other_cores()),
              "runs": runs, "overhead": overhead}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
