"""The prefix cache and structured output, on the CPU, in one run.

    python benchmarks/bench_prefix.py [--requests 16] [--rate 0.6] [--rounds 2]

Prefix cache: a stream of chat requests on the bundled SmolLM2-135M-Instruct with the bigfive bank,
each made of one of three ~300-token system prompts and a short user turn, personas mixed: half
of the requests use the service's own persona (explicit weights: a deployment pairs its system
prompt with one), a quarter none, a quarter "auto" (keyed by the gates its router gives for the
whole prompt, so it shares blocks only with prompts that route the same), arriving open-loop at
--rate requests/s (seeded exponential gaps), 16 new tokens each, through the engine's background
scheduler.  The same stream runs with the cache
on and off, rounds interleaved (on, off, on, off; a fresh cache each "on" round): time to first
token p50/p99 and throughput (generated tokens over the stream's wall time), and the cache's hits.

Structured output: the same prompt asking for JSON, generated free and under a JSON schema,
interleaved (--struct-rounds): decode ms per token of each (the engine's decode time over its
decode tokens), their ratio, and the replies beside each other.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (command_line, default_out, goals_table,  # noqa: E402
                               machine_info, write_json)

SYSTEMS = [
    "You are the front-desk assistant of a busy dental clinic in the city centre. Greet patients warmly, answer "
    "questions about opening hours (Monday to Friday 8am to 6pm, Saturday 9am to 1pm, closed on Sundays and public "
    "holidays), services (check-ups, cleaning, fillings, root canals, crowns, whitening, children's dentistry and "
    "emergency care), prices (a check-up costs 60 euros, cleaning 80 euros, a filling from 90 euros, whitening "
    "250 euros; children under twelve are seen free of charge for check-ups) and insurance (we accept all public "
    "insurers and most private ones; patients should bring their insurance card to every visit). Never give "
    "medical diagnoses; for pain, bleeding or swelling advise an emergency appointment the same day, and for "
    "severe swelling with fever tell the patient to go to the hospital. Keep answers short, polite and concrete, "
    "and always offer to book an appointment. If a patient is anxious, reassure them that our dentists are gentle, "
    "that every step is explained before it happens, and that sedation is available on request. Appointments can "
    "be cancelled free of charge up to 24 hours before; later cancellations cost 20 euros. The clinic is on the "
    "second floor with a lift, there is a car park behind the building, and the tram stop Central Square is two "
    "minutes away. Do not discuss other patients or share any personal data. Answer in the language of the question.",
    "You are a support agent for an online bookshop that sells printed books, e-books and audiobooks. Orders ship "
    "within two working days; delivery takes three to five days in Europe and up to ten days elsewhere, and express "
    "delivery in Europe takes one to two days for an extra eight euros. Returns are free within thirty days if the "
    "book is unused and in its original condition; e-books and audiobooks cannot be returned once downloaded, but "
    "a faulty file is always replaced. Customers can track orders with the link in their confirmation email or in "
    "their account under My Orders. Payment by card, PayPal or bank transfer; bank transfers delay shipping until "
    "the money arrives. Gift wrapping costs two euros and a handwritten card is free. Loyalty members collect one "
    "point per euro and get a ten euro voucher at one hundred points; points expire after two years. Pre-orders "
    "are charged on the day of release. Be friendly and efficient, apologise for delays, never promise dates you "
    "cannot keep, and escalate damaged or lost parcels to a human colleague with the order number and a photo. "
    "Never ask for full card numbers or passwords. If a customer asks for a recommendation, ask what they enjoyed "
    "reading recently and suggest two or three titles with one sentence each.",
    "You are a calm, supportive listener for a university student wellbeing service. Listen first, reflect what "
    "the student says in your own words, and ask one gentle question at a time. Do not diagnose, label or "
    "prescribe, and do not give medical advice. Suggest small practical next steps such as regular sleep, short "
    "breaks while studying, a walk outside, eating regularly, talking to a tutor, a friend or a family member, "
    "and mention that free and confidential counselling sessions can be booked through the wellbeing office on "
    "the ground floor of the library or by email. Exam stress, homesickness, loneliness, money worries and "
    "relationship problems are common, and students should hear that asking for help is a strength. If a student "
    "mentions self-harm, thoughts of suicide or being in danger, give the emergency number 112 and the 24-hour "
    "helpline at once and encourage them to contact someone they trust right now. Keep a warm, non-judgemental "
    "tone, avoid jargon, never minimise what the student feels, and never make promises about grades or deadlines; "
    "extensions are decided by the faculty office. Respect privacy: do not ask for names or student numbers. "
    "Close each answer by asking whether they would like more help or information.",
]
# each service's own persona (a deployment pairs its system prompt with one); requests use it,
# none, or "auto"
SERVICE_PERSONAS = [{"agreeableness+": 0.8}, {"conscientiousness+": 0.7},
                    {"agreeableness+": 0.5, "neuroticism-": 0.5}]
QUESTIONS = ["Can I come on Saturday?", "How much does it cost?", "I am nervous, what should I do?",
             "Where is my order?", "Can I return an e-book?", "I feel overwhelmed by exams.",
             "Do you take my insurance?", "How long is delivery to Canada?", "I cannot sleep before tests."]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 3, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
JSON_PROMPT = "Describe a fictional person as JSON with a name, an age and a list of hobbies."


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.6, help="arrivals per second")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (cache on, cache off)")
    ap.add_argument("--struct-rounds", type=int, default=7)
    ap.add_argument("--struct-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("bench_prefix"))
    return ap


def persona_kind(p) -> str:
    return "base" if p is None else "auto" if p == "auto" else "explicit"


def stream_specs(eng, n: int, seed: int) -> list[tuple[list[int], object]]:
    """n (prompt ids, persona): a system prompt, a user turn, and the service's persona (half of
    the requests), none (a quarter) or "auto" (a quarter)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randrange(len(SYSTEMS))
        msgs = [{"role": "system", "content": SYSTEMS[k]}, {"role": "user", "content": rng.choice(QUESTIONS)}]
        persona = [SERVICE_PERSONAS[k], SERVICE_PERSONAS[k], None, "auto"][i % 4]
        out.append((eng.tokenizer.encode(eng.tokenizer.render(msgs)), persona))
    return out


def run_stream(eng, specs, gaps, new_tokens: int, cache_on: bool) -> dict:
    from pf_engine.generation.sampling import SamplingParams
    eng.set_prefix_cache(1.0 if cache_on else 0)
    sched = eng.new_scheduler(slots=4, max_len=512)
    reqs, t0 = [], time.perf_counter()
    for (ids, persona), gap in zip(specs, gaps):
        time.sleep(gap)
        reqs.append(sched.submit(ids, SamplingParams(max_new_tokens=new_tokens), persona))
    for r in reqs:
        r.result()
    wall = time.perf_counter() - t0
    ttft = sorted(r.t_first - r.t_submit for r in reqs)
    tokens = sum(len(r.tokens) for r in reqs)
    cache = eng.prefix_cache()
    by_kind = {}
    for r, (_, persona) in zip(reqs, specs):
        by_kind.setdefault(persona_kind(persona), []).append(r.t_first - r.t_submit)
    row = {"cache": cache_on, "ttft_p50_s": statistics.median(ttft),
           "ttft_p50_by_kind_s": {k: statistics.median(v) for k, v in by_kind.items()},
           "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "wall_s": wall,
           "throughput_tok_s": tokens / wall, "prompt_tokens": sum(len(r.ids) for r in reqs),
           "cached_tokens": sum(r.cached_tokens for r in reqs)}
    if cache is not None:
        row.update(hits=cache.stats.hits, hit_tokens=cache.stats.hit_tokens, evictions=cache.stats.evictions)
    return row


def structured_rows(eng, rounds: int, n: int) -> dict:
    """Decode ms/token free and under the schema, over the same number of tokens: the structured
    reply's length (it stops when the JSON is complete; the free one runs on)."""
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    eng.set_prefix_cache(0)
    held = eng.generate([JSON_PROMPT], max_new_tokens=n, chat=True, response_format=rf)[0]
    n = len(held.token_ids)
    samples = {"free": [], "json_schema": []}
    texts = {}
    for _ in range(rounds):
        for kind in samples:
            kw = {"response_format": rf} if kind == "json_schema" else {}
            out = eng.generate([JSON_PROMPT], max_new_tokens=n, chat=True, **kw)[0]
            st = eng.stats
            samples[kind].append(1e3 * st.decode_s / max(1, st.decode_tokens))
            texts[kind] = out.text
    free, js = statistics.median(samples["free"]), statistics.median(samples["json_schema"])
    return {"free_ms_per_token": free, "json_schema_ms_per_token": js, "ratio": js / free, "tokens": n,
            "samples": samples, "replies": texts}


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine import Engine
    torch.set_num_threads(args.threads)
    eng = Engine.from_pretrained(adapters="bigfive", progress=False)
    specs = stream_specs(eng, args.requests, args.seed)
    rng = random.Random(args.seed + 1)
    gaps = [0.0] + [rng.expovariate(args.rate) for _ in range(args.requests - 1)]
    run_stream(eng, specs[:2], [0, 0], 2, True)                     # warm-up
    rows = []
    for rnd in range(args.rounds):
        for on in (True, False):
            rows.append(run_stream(eng, specs, gaps, args.new_tokens, on))
            print(f"round {rnd + 1}/{args.rounds} cache {'on' if on else 'off'}: "
                  f"TTFT p50 {rows[-1]['ttft_p50_s']:.2f} s", file=sys.stderr)
    med = {}
    for on in (True, False):
        rs = [r for r in rows if r["cache"] == on]
        med["on" if on else "off"] = {k: statistics.median(r[k] for r in rs)
                                      for k in ("ttft_p50_s", "ttft_p99_s", "throughput_tok_s")}
        med["on" if on else "off"]["ttft_p50_by_kind_s"] = {
            k: statistics.median(r["ttft_p50_by_kind_s"][k] for r in rs) for k in rs[0]["ttft_p50_by_kind_s"]}
    struct = structured_rows(eng, args.struct_rounds, args.struct_tokens)
    return {"benchmark": "bench_prefix", "command": command_line("benchmarks/bench_prefix.py", argv or sys.argv[1:]),
            "machine": machine_info(), "threads": args.threads, "requests": args.requests, "rate": args.rate,
            "new_tokens": args.new_tokens, "weights": eng.weight_formats,
            "prompt_tokens_mean": statistics.mean(len(s[0]) for s in specs), "rows": rows, "median": med,
            "ttft_p50_ratio": med["off"]["ttft_p50_s"] / med["on"]["ttft_p50_s"],
            "throughput_ratio": med["on"]["throughput_tok_s"] / med["off"]["throughput_tok_s"],
            "structured": struct}


def goals(res: dict) -> list[tuple[str, str, bool]]:
    s = res["structured"]
    return [("TTFT p50 >= 3x lower with the prefix cache", f"{res['ttft_p50_ratio']:.2f}x", res["ttft_p50_ratio"] >= 3),
            ("throughput not lower with the prefix cache", f"{res['throughput_ratio']:.2f}x",
             res["throughput_ratio"] >= 1),
            ("structured decoding <= 1.15x free decoding per token", f"{s['ratio']:.2f}x", s["ratio"] <= 1.15)]


def markdown(res: dict) -> str:
    m = res["median"]
    lines = [f"{res['machine']['cpu']}, {res['threads']} threads, {res['weights']}; {res['requests']} requests at "
             f"{res['rate']} req/s, prompts of {res['prompt_tokens_mean']:.0f} tokens on average (three system "
             f"prompts), {res['new_tokens']} new tokens each; medians over rounds", "",
             "| prefix cache | TTFT p50 s | TTFT p99 s | throughput tok/s |", "|---|---|---|---|"]
    for k in ("on", "off"):
        lines.append(f"| {k} | {m[k]['ttft_p50_s']:.2f} | {m[k]['ttft_p99_s']:.2f} | {m[k]['throughput_tok_s']:.1f} |")
    kinds = sorted(m["on"].get("ttft_p50_by_kind_s", {}))
    if kinds:
        lines += ["", "| TTFT p50 s by persona | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for k in ("on", "off"):
            lines.append(f"| cache {k} | " + " | ".join(f"{m[k]['ttft_p50_by_kind_s'][x]:.2f}" for x in kinds) + " |")
    hit = [r for r in res["rows"] if r["cache"]]
    if hit:
        lines += ["", f"Cache on, per round: {hit[0]['hits']} of {res['requests']} requests hit, "
                  f"{hit[0]['cached_tokens']} of {hit[0]['prompt_tokens']} prompt tokens reused."]
    s = res["structured"]
    lines += ["", f"Decoding, {s.get('tokens', '?')} tokens each, median of the rounds:", "",
              "| decoding | ms/token |", "|---|---|",
              f"| free | {s['free_ms_per_token']:.1f} |", f"| json_schema | {s['json_schema_ms_per_token']:.1f} |",
              "", "Replies to the same prompt (greedy):", "",
              f"- free: {json.dumps(s['replies']['free'][:300])}",
              f"- json_schema: {json.dumps(s['replies']['json_schema'][:300])}",
              ""] + goals_table(goals(res), 23)
    return "\n".join(lines)


def main(argv=None) -> int:
    res = run(argv)
    write_json(build_parser().parse_args(argv).out, res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
