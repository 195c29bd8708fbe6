"""pf-serve's replicas on Ray Serve (issue 38): one replica, two replicas routed round-robin, and
two routed by persona and system prompt (serve/affinity.py), on the same request stream through
the real openai client; then a replica SIGKILLed during a 64-request burst.

    python benchmarks/bench_replicas.py --out benchmarks/results/bench_replicas.json
    python benchmarks/bench_replicas.py --requests 12 --no-fault          # a quick look

The bundled SmolLM2-135M-Instruct (4-bit) with the bigfive bank, a local Ray instance.  Chat
requests made of one of bench_prefix.py's three ~300-token system prompts and a short user
turn, the persona of each drawn independently (none, "auto", or one pole, as a model id),
arriving open-loop at --rate requests/s (seeded exponential gaps), streamed, --new-tokens each.
Per mode: TTFT p50/p99 (first content chunk), requests/s over the stream's wall time, and the
prefix cache's hit rate: cached prompt tokens over prompt tokens, from each reply's usage.

On this machine every replica shares the same cores (one replica gets all --threads, two get
half each), so requests/s cannot grow with replicas here; on N hosts each replica has its own
cores and the stream's throughput is at most N times one replica's, less the ingress's share.

Goals: hit rate with affinity >= 1.5x round-robin's, TTFT p50 lower; a replica killed during
the burst: every request not on it answered, the endpoint answering again within 30 s, none hung.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_prefix import QUESTIONS, SYSTEMS  # noqa: E402
from benchmarks.common import (command_line, default_out, goals_table,  # noqa: E402
                               machine_info, run_main)

MODES = (("one", 1, "affinity"), ("round-robin", 2, "round-robin"), ("affinity", 2, "affinity"))
POLES = ["openness+", "conscientiousness+", "extraversion+", "agreeableness+", "neuroticism-"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.5, help="arrivals per second")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads over all replicas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=int, default=1,
                    help="each system prompt in this many variants (a tenant line first): "
                         "3 x V distinct prefixes")
    ap.add_argument("--no-fault", action="store_true", help="skip the killed-replica burst")
    ap.add_argument("--out", default=default_out("bench_replicas.json"))
    return ap


def stream(n: int, seed: int, mid: str, variants: int = 1) -> list[tuple[str, list[dict]]]:
    """n (model id, messages): a system prompt (one of 3 x ``variants``: a tenant's line, then
    one of the three) and a user turn, and independently of them the base model, "auto" or
    one pole."""
    rng = random.Random(seed)
    models = [mid, f"{mid}:auto"] + [f"{mid}:{p}" for p in POLES]
    systems = [(f"Tenant {v}. " if variants > 1 else "") + s
               for v in range(variants) for s in SYSTEMS]
    return [(rng.choice(models), [{"role": "system", "content": rng.choice(systems)},
                                  {"role": "user", "content": rng.choice(QUESTIONS)}])
            for _ in range(n)]


async def one(client, model: str, msgs: list[dict], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    chunks = await client.chat.completions.create(
        model=model, messages=msgs, max_tokens=new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for ch in chunks:
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text += ch.choices[0].delta.content
        if ch.usage is not None:
            usage = ch.usage
    details = (usage.prompt_tokens_details.model_dump() if usage and usage.prompt_tokens_details
               else {})
    return {"ttft_s": first if first is not None else time.perf_counter() - t0, "text": text,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": details.get("cached_tokens") or 0}


async def run_stream(url: str, specs, gaps, new_tokens: int) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0, tasks = time.perf_counter(), []
    for (model, msgs), gap in zip(specs, gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.ensure_future(one(client, model, msgs, new_tokens)))
    rows = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    ttft = sorted(r["ttft_s"] for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows)
    return {"ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
            "requests_per_s": len(rows) / wall, "wall_s": wall, "prompt_tokens": prompt,
            "cached_tokens": sum(r["cached_tokens"] for r in rows),
            "hit_rate": sum(r["cached_tokens"] for r in rows) / max(1, prompt),
            "replies": [r["text"] for r in rows]}


def metrics(url: str) -> dict:
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("pf_router_decisions_total"):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def base_id(url: str) -> str:
    import httpx
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def wait_up(url: str, timeout_s: float = 300) -> None:
    import httpx
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(url + "/v1/models", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"bench_replicas: the endpoint at {url} did not come up")


def deploy(replicas: int, router: str, threads: int, port: int) -> str:
    from pf_engine.serve import ray_serve
    spec = {"engine": {"adapters": "bigfive"}, "scheduler": {}, "prefix_cache_gb": None,
            "model_id": None, "threads": max(1, threads // replicas),
            "server": {"max_queue": 256, "timeout_s": 600.0, "max_body": 8 << 20}}
    ray_serve.deploy(spec, replicas, "127.0.0.1", port, None, 8 << 20,
                     cpus=max(1, threads // replicas), router=router)
    url = f"http://127.0.0.1:{port}"
    wait_up(url)
    return url


def replica_pids() -> list[int]:
    import ray
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "#Replica#" in a["name"]]
    return [ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(
        lambda _self: os.getpid())) for a in names]


async def burst_with_kill(url: str, mid: str, seed: int, n: int = 64) -> dict:
    """64 streamed requests at once on two replicas; one replica SIGKILLed once the first token
    arrives: how many were answered, failed (with what), hung; when a new request is answered."""
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    specs = stream(n, seed + 7, mid)
    first = asyncio.Event()

    async def req(model, msgs):
        try:
            chunks = await client.chat.completions.create(model=model, messages=msgs,
                                                          max_tokens=48, temperature=0,
                                                          stream=True)
            async for ch in chunks:
                first.set()
            return "ok", ""
        except Exception as e:  # noqa: BLE001 - counted with its message
            return "failed", f"{type(e).__name__}: {e}"
    pids = replica_pids()
    tasks = [asyncio.ensure_future(req(m, msgs)) for m, msgs in specs]
    await asyncio.wait_for(first.wait(), 300)
    os.kill(pids[0], signal.SIGKILL)
    t_kill = time.monotonic()
    done, pending = await asyncio.wait(tasks, timeout=300)
    results = [t.result() for t in done]
    for t in pending:
        t.cancel()
    probing = asyncio.ensure_future(first_answered(client, mid, t_kill))
    replaced = await asyncio.to_thread(replaced_after, t_kill)
    (sent_ok, done_ok), probe_errors = await probing
    failed = [msg for st, msg in results if st == "failed"]
    await client.close()
    return {"requests": n, "answered": sum(st == "ok" for st, _ in results),
            "failed": len(failed), "hung": len(pending), "failures": sorted(set(failed))[:3],
            "answered_by_replica": replica_counts(url), "probe_errors": probe_errors[:5],
            "probes_failed": len(probe_errors),
            "answering_again_after_s": sent_ok, "first_answer_done_after_s": done_ok,
            "replaced_after_s": replaced}


def replaced_after(t_kill: float, timeout_s: float = 120) -> float | None:
    """Seconds from the kill until Ray Serve reports both replicas running again."""
    from ray import serve
    from pf_engine.serve.ray_serve import APP
    time.sleep(1.0)                       # the controller's first look at the dead one
    while time.monotonic() - t_kill < timeout_s:
        states = serve.status().applications[APP].deployments["Replica"].replica_states
        if states.get("RUNNING", 0) >= 2 and len(states) == 1:
            return time.monotonic() - t_kill
        time.sleep(0.5)
    return None


async def first_answered(client, mid: str, t_kill: float, every_s: float = 0.5):
    """Probes (one token each) every ``every_s`` from the kill on, concurrently: (seconds from
    the kill to the sending of the first probe that was answered, to that answer's end); the
    answer waits behind the burst's queue, so the first figure is the endpoint's recovery."""
    errors: list[str] = []

    async def probe(sent: float):
        try:
            await client.chat.completions.create(model=mid, max_tokens=1, temperature=0,
                                                 messages=[{"role": "user", "content": "again"}])
            return sent, time.monotonic() - t_kill
        except Exception as e:  # noqa: BLE001 - a probe the endpoint failed
            errors.append(f"{sent:.1f} s: {type(e).__name__}: {str(e)[:160]}")
            return None
    probes = []
    while time.monotonic() - t_kill < 60:
        probes.append(asyncio.ensure_future(probe(time.monotonic() - t_kill)))
        await asyncio.sleep(every_s)
        if any(p.done() and p.result() is not None for p in probes):
            break
    answered = [r for r in await asyncio.gather(*probes) if r is not None]
    return (min(answered) if answered else (None, None)), errors


def replica_counts(url: str) -> dict:
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("pf_replica_requests_total"):
            labels = line[line.index("{") + 1:line.index("}")]
            out[labels] = float(line.split()[-1])
    return out


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine.serve import ray_serve
    rng = random.Random(args.seed + 1)
    gaps = [0.0] + [rng.expovariate(args.rate) for _ in range(args.requests - 1)]
    rows, port, mid = [], 8700 + args.seed % 100, None
    for name, replicas, router in MODES:
        url = deploy(replicas, router, args.threads, port)
        mid = mid or base_id(url)
        specs = stream(args.requests, args.seed, mid, args.variants)
        asyncio.run(run_stream(url, specs[:2], [0, 0], 2))          # warm-up (caches cleared
        res = asyncio.run(run_stream(url, specs, gaps, args.new_tokens))   # by a redeploy)
        res.update(mode=name, replicas=replicas, router=router, decisions=metrics(url))
        rows.append(res)
        print(f"{name}: TTFT p50 {res['ttft_p50_s']:.2f} s, hit rate {res['hit_rate']:.2f}, "
              f"{res['requests_per_s']:.2f} req/s", file=sys.stderr)
        ray_serve.shutdown()
    out = {"benchmark": "bench_replicas",
           "command": command_line("benchmarks/bench_replicas.py",
                                   sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "threads": args.threads, "requests": args.requests,
           "rate": args.rate, "new_tokens": args.new_tokens, "variants": args.variants,
           "rows": rows}
    by = {r["mode"]: r for r in rows}
    out["replies_equal"] = all(r["replies"] == rows[0]["replies"] for r in rows)
    for r in rows:
        del r["replies"]
    out["hit_rate_ratio"] = by["affinity"]["hit_rate"] / max(1e-9, by["round-robin"]["hit_rate"])
    out["ttft_ratio"] = by["round-robin"]["ttft_p50_s"] / by["affinity"]["ttft_p50_s"]
    if not args.no_fault:
        url = deploy(2, "affinity", args.threads, port)
        out["fault"] = asyncio.run(burst_with_kill(url, mid, args.seed))
        ray_serve.shutdown()
    return out


def goals(res: dict) -> list[tuple[str, str, bool]]:
    g = [("prefix-cache hit rate with affinity >= 1.5x round-robin's",
          f"{res['hit_rate_ratio']:.2f}x", res["hit_rate_ratio"] >= 1.5),
         ("TTFT p50 lower with affinity than round-robin",
          f"{res['ttft_ratio']:.2f}x lower", res["ttft_ratio"] > 1.0),
         ("replies equal in every mode", str(res["replies_equal"]), res["replies_equal"])]
    f = res.get("fault")
    if f:
        rep = f["replaced_after_s"]
        ok = (f["hung"] == 0 and f["probes_failed"] == 0 and rep is not None and rep <= 30
              and f["answered"] + f["failed"] == f["requests"])
        g += [("a replica killed mid-burst: the others' requests answered, none hung, the "
               "endpoint answering (and whole again) within 30 s",
               f"{f['answered']} answered, {f['failed']} failed (on the killed replica), "
               f"{f['hung']} hung of {f['requests']}; {f['probes_failed']} of the requests sent "
               f"after the kill failed; replaced after "
               f"{'never' if rep is None else f'{rep:.1f} s'}", ok)]
    return g


def markdown(res: dict) -> str:
    lines = [f"{res['machine']['cpu']}, {res['threads']} threads over all replicas; "
             f"{res['requests']} chat requests at {res['rate']} req/s on "
             f"{3 * res.get('variants', 1)} ~300-token system prompts, persona drawn "
             "independently; the replicas share this machine's cores", "",
             "| mode | replicas | router | TTFT p50 s | TTFT p99 s | requests/s | cache hit rate |"
             " decisions (persona / prefix / load / new) |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        d = r["decisions"]
        lines.append(f"| {r['mode']} | {r['replicas']} | {r['router']} | {r['ttft_p50_s']:.2f} | "
                     f"{r['ttft_p99_s']:.2f} | {r['requests_per_s']:.2f} | {r['hit_rate']:.2f} | "
                     + (" / ".join(f"{d.get(k, 0):.0f}" for k in
                                   ("persona", "prefix", "load", "new")) if r["router"] ==
                        "affinity" else "-") + " |")
    lines += [""] + goals_table(goals(res), 38)
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main(run, goals, build_parser().parse_args(argv).out, argv)


if __name__ == "__main__":
    sys.exit(main())
