"""A benchmark client written for vLLM runs against pf-serve unchanged (issue 39): guidellm's
OpenAI HTTP backend, which sends ``ignore_eos``, ``max_tokens`` and ``stream_options``
(``include_usage``) on every request, against pf-serve on the bundled model.

    pip install guidellm                       # in a venv of its own: it pins its own torch
    python benchmarks/bench_guidellm.py --guidellm /path/to/venv/bin/guidellm \\
        --out benchmarks/results/bench_guidellm.json

pf-serve starts on 127.0.0.1 (the bundled model, its defaults), then guidellm runs each profile
(``synchronous``: one request at a time; ``concurrent``: --streams at once) for --requests
synthetic requests of --prompt-tokens / --output-tokens tokens, its output read from its JSON.
Goals: every request completes, none errors, and each has exactly --output-tokens tokens (EOS
ignored, as the client asks).  Never in CI (guidellm is not a dependency).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import command_line, default_out, goals_table, machine_info, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--out", default=default_out("bench_guidellm.json"))
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"pf-serve did not answer {url}/health within {timeout_s:g} s")


def summary(report: dict) -> dict:
    """What a profile's guidellm JSON says: counts, tokens per request, latencies, throughput."""
    b = report["benchmarks"][0]
    m = b["metrics"]

    def ok(name, stat="median"):
        return m[name]["successful"][stat]
    out = m["output_token_count"]["successful"]
    return {"profile": b["config"]["profile"]["kind"], **m["request_totals"],
            "output_tokens_min": out["min"], "output_tokens_max": out["max"],
            "prompt_tokens_median": ok("prompt_token_count"),
            "ttft_ms_median": ok("time_to_first_token_ms"),
            "itl_ms_median": ok("inter_token_latency_ms"),
            "output_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
            "requests_per_s": m["requests_per_second"]["successful"]["mean"]}


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine.model.bundled import default_model_dir
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "pf_engine.cli.serve", "--port", str(port),
                               "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows, version = [], None
    try:
        wait_up(url)
        version = subprocess.run([args.guidellm, "--version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        for profile in ("synchronous", f"concurrent,streams={args.streams}"):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "report.json")
                cmd = [args.guidellm, "run", "--backend", f"kind=openai_http,target={url}",
                       "--profile", f"kind={profile}",
                       "--constraint", f"kind=max_requests,count={args.requests}",
                       "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                                 f"output_tokens={args.output_tokens}",
                       "--tokenizer", f"kind=huggingface_auto,model={default_model_dir()}",
                       "--output", f"kind=json,path={path}", "--disable-progress"]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                with open(path) as f:
                    rows.append(summary(json.load(f)))
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"benchmark": "bench_guidellm",
            "command": command_line("benchmarks/bench_guidellm.py",
                                    sys.argv[1:] if argv is None else argv),
            "machine": machine_info(), "guidellm": version, "requests": args.requests,
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "rows": rows}


def goals(res: dict) -> list[tuple[str, str, bool]]:
    out = []
    for r in res["rows"]:
        out.append((f"guidellm {r['profile']}: every request completes, none errors",
                    f"{r['successful']}/{r['total']}, {r['errored']} errored",
                    r["successful"] == r["total"] == res["requests"] and r["errored"] == 0))
        out.append((f"guidellm {r['profile']}: ignore_eos honoured ({res['output_tokens']} tokens each)",
                    f"{r['output_tokens_min']:.0f}..{r['output_tokens_max']:.0f}",
                    r["output_tokens_min"] == r["output_tokens_max"] == res["output_tokens"]))
    return out


def markdown(res: dict) -> str:
    lines = [f"{res['guidellm']}, {res['requests']} requests per profile, {res['prompt_tokens']} "
             f"prompt / {res['output_tokens']} output tokens (synthetic; the prompt as the chat "
             "template wraps it)", "",
             "| profile | completed | errored | prompt tokens | output tokens | TTFT ms p50 | ITL ms p50 "
             "| output tok/s | requests/s |", "|---" * 9 + "|"]
    for r in res["rows"]:
        lines.append(f"| {r['profile']} | {r['successful']} | {r['errored']} | "
                     f"{r['prompt_tokens_median']:.0f} | {r['output_tokens_min']:.0f} | "
                     f"{r['ttft_ms_median']:.0f} | {r['itl_ms_median']:.1f} | {r['output_tok_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} |")
    return "\n".join(lines + [""] + goals_table(goals(res), 39))


if __name__ == "__main__":
    args = build_parser().parse_args()
    sys.exit(run_main(run, goals, args.out))
