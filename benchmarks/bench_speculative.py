"""Speculative decoding by prompt lookup on the bundled model (issue 39): decode speed with drafts
against without, on a stream whose replies repeat the prompt and on one where drafts miss, and
the greedy tokens of every persona kind with and without, in one process.

    python benchmarks/bench_speculative.py --out benchmarks/results/bench_speculative.json
    python benchmarks/bench_speculative.py --rounds 1 --new-tokens 32 --draft 4   # quick

Streams (chat prompts, greedy, up to --new-tokens tokens ending at EOS as replies do, one
request at a time, prefix cache off): ``editing`` asks the model to copy or correct a passage
given in the prompt, each longer than the reply (the reply repeats it: drafts found, and
accepted where the small model copies faithfully); ``counting`` asks for number sequences (the
lookup finds the text after the last comma, the previous number: many drafts rejected);
``missed`` is the open prompts with every draft wrong (ForcedMisses: the worst case); ``open`` asks open
questions (drafts, where the n-gram lookup finds any, mostly rejected).  For each round, each
stream and both modes (speculative_tokens 0 and --draft, the first alternating between rounds):

    decode tok/s = (tokens - 1) / (t_N - t_1)       (t_1: a 1-token generate; bench_generate's)
    speedup = decode tok/s with drafts / without (median over rounds)

Equality: for base, an explicit top-2 persona and "auto" (bigfive's router), each editing prompt's
--new-tokens greedy tokens with drafts against without.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_generate import TOP2  # noqa: E402
from benchmarks.common import (command_line, default_out, goals_table, machine_info,  # noqa: E402
                               no_prefix_cache, run_main)

PASSAGES = [                             # each longer than --new-tokens: the reply is a copy
    "The library opens at nine on weekdays and at ten on weekends. Members may borrow up to "
    "six books at a time, and each loan lasts three weeks. Late returns cost ten cents a day. "
    "Children under twelve need a parent to sign their card. The reading room on the second "
    "floor is quiet at all times, and phones must be set to silent there. The library also "
    "lends laptops for use inside the building, for up to two hours, with a valid card. Books "
    "can be returned at any branch, or in the drop box by the front door when it is closed.",
    "Our team meets every Monday to review the week's goals. Each person shares what they "
    "finished, what is blocked and what they plan next, and the notes go to the shared folder. "
    "On Thursdays we hold a short demo where anyone can show work in progress and ask for "
    "feedback. New members pair with a buddy for their first month, who helps them set up their "
    "tools, meet the other teams and pick a first task. Once a quarter we plan the next three "
    "months together and write down what we will not do, so that the list stays short.",
    "To reset the router, unplug it for thirty seconds, plug it back in and wait until the "
    "light turns green. If the light stays orange, hold the reset button for ten seconds. The "
    "router then restarts with its factory settings, and the network name and password are the "
    "ones printed on the label underneath. Connect a laptop to that network, open a browser "
    "and go to the address on the label to choose a new name and password. Write them down "
    "and keep them somewhere safe, since the old ones will no longer work on any device.",
    "The museum's new wing holds paintings from the eighteenth century, a room of early "
    "photographs and a small garden with sculptures by local artists from the last fifty years. "
    "Guided tours start every hour from the main hall and last about forty minutes. The cafe "
    "on the ground floor serves soup, sandwiches and cakes until four in the afternoon. "
    "Tickets are free for students and for everyone on the first Sunday of each month, and "
    "the museum stays open until nine in the evening on Fridays during the summer months.",
]
EDITING = ["Copy this text exactly, word for word:\n\n{}",
           "Fix any spelling mistakes and rewrite the full text:\n\n{}"]
COUNTING = ["Count from 1 to 80, separated by commas.", "List the even numbers from 2 to 160.",
            "Count down from 99 to 1, separated by commas.",
            "Write the multiples of 7 from 7 to 350."]
OPEN = ["Write a short poem about the sea at night.", "What are three tips for learning a new "
        "language?", "Describe your ideal weekend in a few sentences.",
        "Why do cats like boxes? Give a playful answer."]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft", type=int, default=8, help="speculative_tokens when on")
    p.add_argument("--out", default=default_out("bench_speculative.json"))
    return p


def streams(eng) -> dict[str, list[list[int]]]:
    edit = [EDITING[i % 2].format(p) for i, p in enumerate(PASSAGES)]
    return {"editing": eng._encode(edit, True), "open": eng._encode(OPEN, True),
            "counting": eng._encode(COUNTING, True)}


def decode_rate(eng, ids: list[int], n: int, k: int) -> tuple[float, list[int]]:
    """(decode tok/s, the tokens) of one request of up to n tokens, ending at EOS as a reply
    does: t_1 and t_N generates, (tokens - 1) / (t_N - t_1).  Both modes make the same tokens
    (greedy; the equality rows check it), so they time the same work."""
    def gen(m):
        t0 = time.perf_counter()
        out = eng.generate([ids], max_new_tokens=m, speculative_tokens=k)[0]
        return time.perf_counter() - t0, out.token_ids
    t1, _ = gen(1)
    tn, toks = gen(n)
    return (len(toks) - 1) / max(1e-9, tn - t1), toks


class ForcedMisses:
    """The worst case, for the "missed" row: every draft is ``bad`` (a token the replies never
    hold) k times, so every verify rejects all of it; the back-off (speculative.Drafting) is
    what keeps this cheap."""

    def __init__(self, bad: int):
        self.bad, self.on = bad, False
        from pf_engine.runtime import speculative
        self.mod, self.real = speculative, speculative.propose
        speculative.propose = self.propose

    def propose(self, seq, k):
        return [self.bad] * k if self.on else self.real(seq, k)


def run(argv=None) -> dict:
    from pf_engine import Engine
    args = build_parser().parse_args(argv)
    eng = no_prefix_cache(Engine.from_pretrained(adapters="bigfive", progress=False))
    work = streams(eng)
    work["missed"] = work["open"]
    forced = ForcedMisses(eng.config.vocab_size - 1)
    for ids in work["editing"][:1]:                          # warm-up
        decode_rate(eng, ids, 8, args.draft)
    rates: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        for name, prompts in work.items():
            for k in ((0, args.draft) if rnd % 2 == 0 else (args.draft, 0)):
                key = f"{name}/{'on' if k else 'off'}"
                forced.on = name == "missed"
                r = statistics.mean(decode_rate(eng, ids, args.new_tokens, k)[0] for ids in prompts)
                rates.setdefault(key, []).append(r)
                print(f"round {rnd + 1} {key}: {r:.1f} tok/s", file=sys.stderr, flush=True)
    rows = {name: {"off_tok_s": statistics.median(rates[f"{name}/off"]),
                   "on_tok_s": statistics.median(rates[f"{name}/on"])} for name in work}
    for row in rows.values():
        row["speedup"] = row["on_tok_s"] / row["off_tok_s"]
    acceptance = {}
    st = eng.scheduler().stats
    for name, prompts in work.items():                       # acceptance, on its own pass
        st.draft_tokens = st.accepted_tokens = 0
        forced.on = name == "missed"
        for ids in prompts:
            eng.submit(ids, max_new_tokens=args.new_tokens, speculative_tokens=args.draft).result()
        acceptance[name] = {"drafted": st.draft_tokens, "accepted": st.accepted_tokens}
    forced.on = False
    equal = {}
    for kind, persona in (("base", None), ("explicit top-2", TOP2), ("auto", "auto")):
        same = 0
        for ids in work["editing"]:
            a = eng.generate([ids], max_new_tokens=args.new_tokens, persona=persona,
                             ignore_eos=True)
            b = eng.generate([ids], max_new_tokens=args.new_tokens, persona=persona,
                             ignore_eos=True, speculative_tokens=args.draft)
            same += a[0].token_ids == b[0].token_ids
        equal[kind] = f"{same}/{len(work['editing'])}"
    sample = eng.generate([work["editing"][0]], max_new_tokens=48, speculative_tokens=args.draft)[0]
    return {"benchmark": "bench_speculative",
            "command": command_line("benchmarks/bench_speculative.py",
                                    sys.argv[1:] if argv is None else argv),
            "machine": machine_info(), "weights": eng.weight_formats, "rounds": args.rounds,
            "new_tokens": args.new_tokens, "draft": args.draft, "rows": rows, "rates": rates,
            "acceptance": acceptance, "equal": equal,
            "sample": {"prompt": EDITING[0].format(PASSAGES[0]), "reply": sample.text}}


def goals(res: dict) -> list[tuple[str, str, bool]]:
    e, o = res["rows"]["editing"], res["rows"]["missed"]
    out = [("editing stream decode >= 1.5x without drafts",
            f"{e['speedup']:.2f}x ({e['on_tok_s']:.0f} vs {e['off_tok_s']:.0f} tok/s)",
            e["speedup"] >= 1.5),
           ("missed stream (every draft rejected) >= 0.95x",
            f"{o['speedup']:.2f}x ({o['on_tok_s']:.0f} vs {o['off_tok_s']:.0f} tok/s)",
            o["speedup"] >= 0.95)]
    for kind, same in res["equal"].items():
        n, d = map(int, same.split("/"))
        out.append((f"{kind}: greedy tokens equal with drafts", same, n == d))
    return out


def markdown(res: dict) -> str:
    lines = [f"{res['machine']['cpu']}, {res['weights']}, draft {res['draft']}, "
             f"{res['new_tokens']} new tokens, {res['rounds']} rounds", "",
             "| stream | decode tok/s, no drafts | with drafts | speedup | drafted | accepted |",
             "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        a = res["acceptance"][name]
        lines.append(f"| {name} | {r['off_tok_s']:.1f} | {r['on_tok_s']:.1f} | {r['speedup']:.2f}x "
                     f"| {a['drafted']} | {a['accepted']} |")
    return "\n".join(lines + [""] + goals_table(goals(res), 39))


if __name__ == "__main__":
    args = build_parser().parse_args()
    sys.exit(run_main(run, goals, args.out))
