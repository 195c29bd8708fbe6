"""Perplexity of one GGUF on one text, pf_engine against llama.cpp: the same tokens, the same windows.

    python benchmarks/bench_ppl.py                                 # bundled SmolLM2 Q4_1, 20 windows
    python benchmarks/bench_ppl.py --model M.gguf --ctx 512 --windows 40 --out R.json
    python benchmarks/bench_ppl.py --text book.txt --no-peer       # our side alone, another text

Text (default): Jane Austen's "Pride and Prejudice" (public domain; the Project Gutenberg text as
Debian's r-cran-janeaustenr package ships it), fetched once by benchmarks/ppl_text.py and cached
as $PF_HOME/texts/austen-prideprejudice.txt (685 kB); --text takes any UTF-8 file.

Tokens: the whole text is tokenized once, by pf_engine's tokenizer of the model (the GGUF's own
vocabulary, converted), without special tokens; both engines get these ids.  Where the GGUF sets
tokenizer.ggml.add_bos_token, each window's first token is replaced by BOS, as llama.cpp's
perplexity tool does (--bos on/off overrides).  With llama.cpp present the run also records
whether its tokenizer gives the same ids for the windows' text.

Windows and scoring, as llama.cpp's perplexity tool: the first --windows non-overlapping runs of
--ctx tokens, each evaluated from an empty cache; in each, the tokens of its second half are
scored, each given every token before it in its window: the logits at positions ctx/2 .. ctx-2
predict tokens ctx/2+1 .. ctx-1 (ctx - 1 - ctx/2 tokens a window).  ppl = exp(total NLL /
scored tokens), over all windows.

Ours: Engine.score, the engine's public scoring path (pf-serve's echo + logprobs and lm-eval's
log-likelihoods go through it): the log-softmax of the fp32 logits of one forward, no KV cache.
llama.cpp: llama-cpp-python with logits_all, a window one eval (n_batch = ctx) from an empty
cache; the log-softmax of its logits in float64.  The windows alternate between the engines (ours,
then llama.cpp's, window by window, after one untimed warm-up window each), so both see the same
background load; tok/s: the windows' tokens (windows x ctx) over the engine's own seconds
(llama.cpp: its evals; ours: the whole Engine.score call); --threads each (default 2).  The
engine keeps the file's formats (--quantize f32: every tensor dequantized to fp32).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import llama_peer  # noqa: E402
from benchmarks.common import (CpuWatch, busy_warning, command_line, default_out,  # noqa: E402
                               machine_info, write_json)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--text", default=None, help="a UTF-8 text file (default: Pride and Prejudice, "
                                                 "benchmarks/ppl_text.py)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens a window")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bos", choices=("auto", "on", "off"), default="auto",
                    help="BOS as each window's first token (auto: the GGUF's add_bos_token)")
    ap.add_argument("--quantize", default=None, help="the engine's quantize (None: the file's "
                                                     "formats; f32: all dequantized)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--note", default=None, help="free text kept in the JSON")
    ap.add_argument("--out", default=default_out("bench_ppl.json"))
    return ap


def gguf_bos(path: str) -> int | None:
    """The BOS id when the GGUF asks for one before the text (tokenizer.ggml.add_bos_token)."""
    from gguf import GGUFReader
    fields = GGUFReader(path).fields

    def get(key):
        f = fields.get(key)
        return None if f is None else f.contents()
    return int(get("tokenizer.ggml.bos_token_id")) if get("tokenizer.ggml.add_bos_token") else None


def make_windows(ids: list[int], ctx: int, n: int, bos: int | None) -> list[list[int]]:
    """The first n non-overlapping windows of ctx tokens; BOS (if any) replaces each first token."""
    if len(ids) < n * ctx:
        raise SystemExit(f"bench_ppl: the text has {len(ids)} tokens; {n} windows of {ctx} "
                         f"need {n * ctx}")
    wins = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    return [([bos] + w[1:]) if bos is not None else w for w in wins]


def scored(ctx: int) -> tuple[int, int]:
    """(first, count): positions first .. ctx-2 predict tokens first+1 .. ctx-1 of a window."""
    first = ctx // 2
    return first, ctx - 1 - first


def interleaved(eng, runner, wins: list[list[int]]) -> dict[str, tuple[list[float], float]]:
    """Per window, in turn: Engine.score of it, then llama.cpp's eval of it (runner None: ours
    alone), after one untimed warm-up window each, so that both see the same background load.
    -> per engine (the summed NLL of each window's scored tokens, the seconds of all windows);
    llama.cpp's seconds are its evals' (the log-softmax here in numpy is not its work)."""
    first, _ = scored(len(wins[0]))
    eng.score(wins[:1])
    if runner is not None:
        runner.eval_all(wins[0])
    nll = {"pf_engine": [], "llama_cpp": []}
    sec = {"pf_engine": 0.0, "llama_cpp": 0.0}
    for i, w in enumerate(wins):
        t = time.perf_counter()
        row = eng.score([w])[0]                      # [None, Logprob of token 1, ...]
        sec["pf_engine"] += time.perf_counter() - t
        nll["pf_engine"].append(-math.fsum(lp.logprob for lp in row[first + 1:]))
        if runner is not None:
            sec["llama_cpp"] += runner.eval_all(w)
            nll["llama_cpp"].append(runner.scored_nll(w, first)[0])
        print(f"  window {i + 1}/{len(wins)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return {k: (nll[k], sec[k]) for k in nll if nll[k]}


def side(nll: list[float], sec: float, wins: list[list[int]]) -> dict:
    _, per = scored(len(wins[0]))
    n = per * len(wins)
    return {"ppl": math.exp(math.fsum(nll) / n), "nll_per_token": math.fsum(nll) / n,
            "window_ppl": [math.exp(x / per) for x in nll], "seconds": sec,
            "tokens_per_s": len(wins) * len(wins[0]) / sec}


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.ctx < 4 or args.windows < 1 or args.threads < 1:
        raise SystemExit("bench_ppl: --ctx >= 4, --windows >= 1 and --threads >= 1 expected")
    from pf_engine import Engine
    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from pf_engine.model.bundled import bundled_gguf_path
        model = bundled_gguf_path()
    if not model.endswith(".gguf") or not os.path.isfile(model):
        raise SystemExit(f"bench_ppl: --model {model}: expected an existing .gguf file")
    text_path = args.text
    if text_path is None:
        from benchmarks.ppl_text import austen_text
        text_path = austen_text()
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    peer = not args.no_peer and llama_peer.available()[0]
    if not args.no_peer and not peer:
        print(f"bench_ppl: no llama.cpp row: {llama_peer.available()[1]}", file=sys.stderr)

    watch = CpuWatch()
    t = time.perf_counter()
    eng = Engine.from_pretrained(model, quantize=args.quantize, progress=False)
    load_pf = time.perf_counter() - t
    if eng.tokenizer is None:
        raise SystemExit(f"bench_ppl: {model} has no tokenizer")
    ids = eng.tokenizer.fast.encode(text, add_special_tokens=False).ids
    bos = None
    if args.bos == "auto":
        bos = gguf_bos(model)
    elif args.bos == "on":
        bos = eng.tokenizer.fast.token_to_id(eng.tokenizer.specials["bos_token"] or "")
        if bos is None:
            raise SystemExit("bench_ppl: --bos on, but the tokenizer has no BOS token")
    wins = make_windows(ids, args.ctx, args.windows, bos)
    first, per = scored(args.ctx)
    runner = None
    if peer:
        t = time.perf_counter()
        runner = llama_peer.LlamaRunner(model, args.threads, n_ctx=args.ctx, logits_all=True,
                                        n_batch=args.ctx)
        load_llama = time.perf_counter() - t
        span = args.windows * args.ctx
        theirs = runner.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        same = next((i for i, (a, b) in enumerate(zip(ids[:span], theirs[:span])) if a != b), None)
    print(f"bench_ppl: {len(ids)} tokens in {os.path.basename(text_path)}; {args.windows} windows "
          f"of {args.ctx}, {per * args.windows} scored; pf_engine {eng.weight_formats}",
          file=sys.stderr)
    sides = {k: side(*v, wins) for k, v in interleaved(eng, runner, wins).items()}
    ours = sides["pf_engine"]
    ours.update(load_seconds=load_pf, weight_formats=eng.weight_formats)
    result = {"benchmark": "bench_ppl", "command": command_line("benchmarks/bench_ppl.py",
                                                                 argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "threads": args.threads, "note": args.note,
              "model": model, "model_bytes": os.path.getsize(model), "quantize": args.quantize,
              "text": text_path, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
              "text_tokens": len(ids), "ctx": args.ctx, "windows": args.windows, "bos": bos,
              "scored_first": first, "scored_tokens": per * args.windows, "pf_engine": ours,
              "peer": None, "llama_cpp": None}
    if runner is not None:
        import llama_cpp
        lc = sides["llama_cpp"]
        lc.update(load_seconds=load_llama, tokenizer_first_difference=same)
        result.update(peer=f"llama-cpp-python {llama_cpp.__version__}", llama_cpp=lc,
                      ppl_ratio=ours["ppl"] / lc["ppl"],
                      speed_ratio=ours["tokens_per_s"] / lc["tokens_per_s"],
                      max_window_ppl_ratio=max(abs(a / b - 1) for a, b in
                                               zip(ours["window_ppl"], lc["window_ppl"])))
    result["other_cpu_cores"] = watch.other_cores()
    result["busy"] = busy_warning(result["other_cpu_cores"])
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{os.path.basename(result['model'])} on {os.path.basename(result['text'])}: "
             f"{result['windows']} windows of {result['ctx']} tokens, {result['scored_tokens']} "
             f"scored (second halves); {m['cpu']}, {result['threads']} threads; "
             f"commit {m['commit']}" + (" + uncommitted changes" if m.get("dirty") else ""), "",
             "| engine | perplexity | tokens/s | seconds |", "|---|---|---|---|"]
    for name, key in (("pf_engine", "pf_engine"), ("llama.cpp", "llama_cpp")):
        r = result.get(key)
        if r:
            lines.append(f"| {name} | {r['ppl']:.4f} | {r['tokens_per_s']:.1f} | {r['seconds']:.1f} |")
    if result.get("llama_cpp"):
        lines += ["", f"perplexity ratio (pf_engine / llama.cpp) {result['ppl_ratio']:.4f}, "
                      f"speed ratio {result['speed_ratio']:.2f}x, largest per-window ppl "
                      f"difference {100 * result['max_window_ppl_ratio']:.2f}%; tokenizers "
                      + ("agree" if result["llama_cpp"]["tokenizer_first_difference"] is None else
                         f"differ from token {result['llama_cpp']['tokenizer_first_difference']}")]
    if result.get("busy"):
        lines += ["", result["busy"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    result = run(argv)
    out = build_parser().parse_args(argv).out
    write_json(out, result)
    print(markdown(result))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
