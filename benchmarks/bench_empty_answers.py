"""Empty arithmetic answers: where a persona expert ends a plain completion before answering.

    python benchmarks/bench_empty_answers.py --bank shipped=bigfive --bank new=B.safetensors
    python benchmarks/bench_empty_answers.py --bank shipped=bigfive --limit 6 --out /tmp/e.json

pf-eval's arithmetic task (data/evals/reasoning_arith.jsonl) reaches the model through
lm-evaluation-harness as "Question: q\\nAnswer:" and decodes greedily; an answer is empty when the
end-of-text token is the most likely first token.  For each bank and each condition (the base
model, every expert at weight 1.0) on the engine's default weights, over the task's questions:

    p_end       mean over questions of softmax(logits at the prompt's last position)[eos]
    argmax_end  how many questions have eos as that position's most likely token

One forward per question (``Engine.logits``), no sampling; the JSON records the machine, the
commit and each bank's digest.  train/README.md's p(end) figures come from this script.
"""
from __future__ import annotations

import argparse
import os
import sys

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import command_line, default_out, machine_info, write_json  # noqa: E402

from pf_engine.train.raw import FORMATS  # noqa: E402
from pf_engine.train.retention import default_evals_dir, read_jsonl  # noqa: E402

PROMPT = FORMATS[0]          # "Question: {q}\nAnswer:", pf-eval's task's doc_to_text (pf_engine/train/retention.py)


def questions(limit: int = 0) -> list[str]:
    """pf-eval's arithmetic questions, file order, at most ``limit`` (0: all)."""
    qs = [r["question"] for r in read_jsonl(os.path.join(default_evals_dir(),
                                                          "reasoning_arith.jsonl"))]
    return qs[:limit] if limit else qs


def first_token(eng, prompts: list[str], persona=None) -> dict:
    """{"p_end", "argmax_end"} of the token after each prompt under ``persona``."""
    eos = eng.tokenizer.hf.eos_token_id
    p_end, top = [], 0
    for text in prompts:
        logits = eng.logits([eng.tokenizer.encode(text)], persona=persona)[0, -1]
        p = torch.softmax(logits.double(), -1)
        p_end.append(float(p[eos]))
        top += int(p.argmax()) == eos
    return {"p_end": round(sum(p_end) / len(p_end), 6), "argmax_end": top, "n": len(p_end)}


def measure(eng, prompts: list[str]) -> dict:
    """The base model's row, then every expert of ``eng``'s bank at weight 1.0."""
    rows = {"base": first_token(eng, prompts)}
    for name in eng.bank.expert_names:
        rows[f"expert:{name}"] = first_token(eng, prompts, {name: 1.0})
    return rows


def parse_bank(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--bank {text!r}: expected LABEL=BANK (a file or "
                                         "a shipped bank's name)")
    return label, path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", type=parse_bank, action="append", required=True,
                   metavar="LABEL=BANK", help="a bank to measure (repeat for several)")
    p.add_argument("--model", default=None, help="the base (default: the bundled model)")
    p.add_argument("--limit", type=int, default=0, help="at most this many questions (0: all)")
    p.add_argument("--out", default=default_out("bench_empty_answers.json"))
    args = p.parse_args(argv)
    from pf_engine import Engine
    from pf_engine.persona.bank import AdapterBank
    prompts = [PROMPT.format(q=q) for q in questions(args.limit)]
    res = {"machine": machine_info(),
           "command": command_line("benchmarks/bench_empty_answers.py", sys.argv[1:]
                                   if argv is None else argv),
           "prompt": PROMPT, "questions": len(prompts), "banks": {}}
    for label, path in args.bank:
        bank = AdapterBank.load(path)
        eng = Engine.from_pretrained(args.model, adapters=bank, progress=False)
        rows = measure(eng, prompts)
        res["banks"][label] = {"bank": path, "digest": bank.digest,
                               "weights": eng.weight_formats, "conditions": rows}
        for name, row in rows.items():
            print(f"{label:10s} {name:30s} p(end) {row['p_end']:.3f}  "
                  f"empty {row['argmax_end']}/{row['n']}")
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
