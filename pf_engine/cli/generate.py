"""pf-generate: generate text with the engine from the command line.

    pf-generate "The capital of France is"                 # bundled SmolLM2-135M-Instruct
    echo "Tell me a joke" | pf-generate --chat --temperature 0.7 --seed 1
    pf-generate "a" "b" --json                             # one JSON object per prompt

Several positional prompts are generated as one batch.  Without a prompt argument the whole of
stdin is the prompt (``--lines``: each non-empty line is one).  Text is streamed when stdout is a
terminal and there is one prompt; load time and prefill / decode tokens/s go to stderr.
"""
from __future__ import annotations

import json
import sys

from pf_engine.errors import PFError
from pf_engine.cli.common import Parser, add_engine_args, check_engine_args, fail


def build_parser() -> Parser:
    p = Parser(prog="pf-generate", description="Generate text with PersonaFuse Engine.")
    p.add_argument("prompt", nargs="*", help="prompt text (several: one batch); default: stdin")
    add_engine_args(p)
    p.add_argument("--persona", default=None,
                   help="'auto', 'token' or weights, e.g. extraversion+=0.8,agreeableness+=0.4")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's generation config, else for --chat "
                        "0.2 (with top-p 0.9, repetition penalty 1.1) and greedy without it")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--truncate", action="store_true", help="keep the tail of over-long prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--lines", action="store_true", help="stdin: one prompt per non-empty line")
    p.add_argument("--quiet", action="store_true", help="no progress bars or timings on stderr")
    return p


def read_prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise PFError("no prompt: pass one as an argument or on stdin")
    text = sys.stdin.read()
    prompts = [ln for ln in text.splitlines() if ln.strip()] if args.lines else [text.rstrip("\n")]
    if not prompts or not any(prompts):
        raise PFError("the prompt read from stdin is empty")
    return prompts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from pf_engine.engine import Engine
        from pf_engine.generation.sampling import GREEDY, SAMPLING_FIELDS, SamplingParams
        given = {f: getattr(args, f) for f in SAMPLING_FIELDS if getattr(args, f) is not None}
        # every bad value named before the model loads (the defaults are checked later)
        SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                       **dict(GREEDY, **given))
        check_engine_args(args, args.persona)
        prompts = read_prompts(args)
        eng = Engine.from_pretrained(args.model, adapters=args.adapters, device=args.device,
                                     dtype=args.dtype, backend=args.backend, quantize=args.quantize,
                                     expert_format=args.expert_format,
                                     deterministic=args.deterministic,
                                     progress=not args.quiet, tensor_parallel=args.tensor_parallel)
        defaults, source = eng.generation_defaults(args.chat)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  stop=args.stop, **dict(defaults, **given))
        if not args.quiet and len(given) < len(SAMPLING_FIELDS):
            print("sampling: " + ", ".join(f"{f}={getattr(sampling, f):g}" for f in SAMPLING_FIELDS)
                  + f"; for the fields not given: {source}", file=sys.stderr)
        kw = dict(chat=args.chat, truncate=args.truncate)
        if args.persona is not None:
            kw["persona"] = args.persona
        if len(prompts) == 1 and not args.json and sys.stdout.isatty():
            for piece in eng.stream(prompts[0], sampling, **kw):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for out in eng.generate(prompts, sampling, **kw):
                if args.json:
                    print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                                      "finish_reason": out.finish_reason, "usage": out.usage,
                                      "gates": out.gates}))
                else:
                    print(out.text)
    except PFError as e:
        return fail("pf-generate", e)
    except KeyboardInterrupt:
        return 130
    if not args.quiet:
        s = eng.stats
        print(f"load {eng.load_s:.2f} s ({eng.weight_formats}) "
              f"| prefill {s.prefill_tokens} tok {s.prefill_tps:.1f} tok/s"
              f" | decode {s.decode_tokens} tok {s.decode_tps:.1f} tok/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
