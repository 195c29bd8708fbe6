"""pf-eval: measure the persona experts and the router on the held-out split.

    pf-eval [--adapters bigfive] [--data DIR] [--model M] [--out benchmarks/results/personas.json]
            [--plot PNG] [--readme PAGE.md] [--limit N] [--max-new-tokens 48]
            [--sample MESSAGE_ID] [--quantize FMT] [--compare JSON] [--no-retention]
            [--quiet]

Writes the JSON (every figure, the generated replies, provenance), the trait x pole heat map
(default: plots/NAME_heatmap.png in the JSON's folder) and,
with --readme, regenerates a page's Personas section from that JSON (benchmarks/PERSONAS.md).
Errors print one line ``pf-eval: error: ...`` and exit with 2.
"""
from __future__ import annotations

import os
import sys

from pf_engine.cli.common import Parser, fail


def build_parser() -> Parser:
    p = Parser(prog="pf-eval", description="Evaluate persona experts and the router on held-out "
               "data beside the base model and system-prompt baselines.")
    p.add_argument("--adapters", default="bigfive", help="bank file or shipped name (bigfive)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="persona corpus folder (default: data/personas of this checkout)")
    p.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "personas.json"),
                   help="JSON to write")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="heat map PNG to write ('' for none; default: beside the JSON, "
                   "plots/NAME_heatmap.png in its folder, made if missing)")
    p.add_argument("--readme", default=None,
                   help="regenerate the Personas section of this page (its markers), e.g. "
                        "benchmarks/PERSONAS.md")
    p.add_argument("--limit", type=int, default=0,
                   help="use at most N items of each kind (0: all; a smoke test)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--quantize", default=None, choices=("f32", "q8", "q4", "bf16", "f16"),
                   help="the weights to evaluate on (default: as the engine serves the model by "
                   "default, the bundled model's 4-bit file; f32: its float weights)")
    p.add_argument("--sample", default=None, metavar="MESSAGE_ID",
                   help="held-out message whose replies the README shows (default: the first)")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="skip the evaluation: redraw the plot and README section from this JSON")
    p.add_argument("--compare", default=None, metavar="JSON",
                   help="another pf-eval JSON (e.g. one made with --quantize f32) whose goal "
                   "figures the README's goals table shows beside this run's")
    p.add_argument("--draws", type=int, default=3, metavar="N",
                   help="greedy draws of the base model and auto for the usefulness goals: draw "
                   "0 as given, each further one with every mixing weight nudged by 1e-6 "
                   "(train/draws.py); the goals read the mean (default 3; 1: one draw)")
    p.add_argument("--no-retention", action="store_true",
                   help="skip the reasoning, safety and social-emotional measures")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def _useful_summary(result: dict) -> str:
    u = result.get("usefulness")
    if not u:
        return ""
    rep, facts = u["replies"], u["facts"]
    return (f"; relevance auto {rep['auto']['relevance']:.3f} vs base "
            f"{rep['base']['relevance']:.3f}; facts auto {facts['auto']['correct']}/"
            f"{facts['auto']['n']} vs base {facts['base']['correct']}/{facts['base']['n']}; "
            f"no-persona prompts at low strength {u['strength']['all']['low_share']:.0%}")


def default_plot(out: str) -> str:
    """The heat map's path for the JSON ``out``: plots/NAME_heatmap.png in its folder (the
    shipped personas.json's is benchmarks/results/plots/personas_heatmap.png), so a run that
    writes its JSON elsewhere leaves the shipped plot alone."""
    folder, name = os.path.split(out)
    return os.path.join(folder, "plots", os.path.splitext(name)[0] + "_heatmap.png")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pf_engine.errors import PFError
    from pf_engine.train import report
    from pf_engine.train.evaluate import evaluate

    try:
        if args.limit < 0 or args.max_new_tokens < 1:
            raise PFError(f"--limit must be >= 0 and --max-new-tokens >= 1, got {args.limit} "
                          f"and {args.max_new_tokens}")
        if args.from_json:
            args.out = args.from_json
        for path in [args.out] + ([args.plot] if args.plot else []):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise PFError(f"cannot write {path}: folder {folder} does not exist")
        if args.plot is None:
            args.plot = default_plot(args.out)
        if args.readme and not os.path.isfile(args.readme):
            raise PFError(f"--readme {args.readme}: no such file")
        if args.compare and not os.path.isfile(args.compare):
            raise PFError(f"--compare {args.compare}: no such file")
        if args.sample is not None:
            from pf_engine.train.data import default_data_dir, load_corpus
            held = load_corpus(args.data or default_data_dir(), ("heldout",)).heldout.messages
            if args.sample not in held:
                raise PFError(f"--sample {args.sample!r} is not a held-out message id; expected "
                              f"one of {', '.join(sorted(held))}")
        if args.from_json:
            result = report.read_json(args.from_json)
            if args.sample is not None and args.sample != result.get("sample"):   # kept in the JSON
                result["sample"] = args.sample
                result["sample_chosen_by"] = "pf-eval " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:])
                report.write_json(result, args.out)
        else:
            source = report.provenance()      # the code that evaluates, read before it runs
            result = evaluate(args.adapters, args.data, args.model, limit=args.limit,
                              max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                              quantize=args.quantize, retention=not args.no_retention,
                              draws=args.draws)
            result["provenance"] = source
            result["command"] = "pf-eval " + " ".join(argv if argv is not None else sys.argv[1:])
            report.write_json(result, args.out)
        if args.plot:
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            report.plot_heatmap(result, args.plot)
        if args.readme:
            rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.readme))) \
                if args.plot else None
            report.update_readme(args.readme, report.readme_section(
                result, os.path.relpath(args.out, os.path.dirname(os.path.abspath(args.readme))),
                rel, result["command"], sample_message=args.sample or result.get("sample"),
                compare=report.read_json(args.compare) if args.compare else None))
    except PFError as e:
        return fail("pf-eval", e)
    if not args.quiet:
        fam = result["families"]
        print(f"pf-eval: wrote {args.out}: experts move their own trait "
              f"{fam['expert']['statements']['moves_own_count']}/10, specificity "
              f"{fam['expert']['statements']['specificity']:.2f} (prompting "
              f"{fam['prompt']['statements']['specificity']:.2f}); router top-2 "
              f"{(result['router'] or {}).get('top2_agreement', float('nan')):.0%}"
              + _useful_summary(result) + f"; {result['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
