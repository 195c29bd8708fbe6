"""pf-eval's outputs: the JSON's provenance, the trait x pole heat map, the README section.

Every number in the README's "Personas" section is read from the JSON pf-eval wrote; the section
sits between ``<!-- personas:start -->`` and ``<!-- personas:end -->`` and is replaced whole.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

from pf_engine.errors import PFError
from pf_engine.train import draws, goals
from pf_engine.train.data import TRAITS
from pf_engine.train.provenance import cpu_name, git_commit, versions

START, END = "<!-- personas:start -->", "<!-- personas:end -->"


def provenance() -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            **git_commit(),
            "versions": versions()}


def _on(cpu: str | None) -> str:
    """", on CPU" where a result names its CPU (results before it did not)."""
    return f", on {cpu}" if cpu else ""


def write_json(result: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PFError(f"cannot write {path}: folder {folder} does not exist")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise PFError(f"cannot read pf-eval results {path}: {e}") from None
    if not isinstance(result, dict) or "families" not in result:
        raise PFError(f"{path} is not a pf-eval results file (no 'families')")
    return result


def plot_heatmap(result: dict, path: str) -> None:
    """Two panels (expert, prompt): rows poles, columns traits, colour the statement shift."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    poles = result["poles"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    mats = {fam: [[result["families"][fam]["statements"]["shift"][p][t] for t in TRAITS]
                  for p in poles] for fam in ("expert", "prompt")}
    vmax = max(abs(v) for m in mats.values() for row in m for v in row) or 1.0
    for ax, fam in zip(axes, ("expert", "prompt")):
        im = ax.imshow(mats[fam], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_xticks(range(len(TRAITS)), [t[:5] for t in TRAITS])
        ax.set_yticks(range(len(poles)), poles)
        for i, row in enumerate(mats[fam]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7)
        ax.set_title({"expert": "LoRA expert {p: 1.0}", "prompt": "system prompt"}[fam])
    fig.colorbar(im, ax=axes, shrink=0.8, label="shift of S_T vs base (nats/token)")
    fig.suptitle("Held-out self-descriptions: trait score shift per pole")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _recipe_lines(rec: dict) -> list[str]:
    """What the recipe generated and kept, and where early stopping stopped each expert."""
    out = []
    br = rec.get("base_replies")
    if br:
        d = br["dropped"]
        out.append(f"Generated data: the base model answered {br['generated']} train prompts; "
                   f"{br['kept']} replies were kept for the KL term (dropped: {d['degenerate']} "
                   f"degenerate, {d['irrelevant']} with relevance < "
                   f"{br['settings']['min_relevance']}, {d['wrong_fact']} wrong facts).")
    cal = (rec.get("router") or {}).get("calibration")
    if cal:
        u, c, st = cal["uncalibrated"], cal["calibrated"], cal["strength"]
        out.append(f"The router's strength is calibrated on its cross-validation folds (train "
                   f"split, each row predicted by a router that did not see it): "
                   f"{st['scale']} * sigmoid({st['slope']:.3f} * (logit(1 - p_none) - "
                   f"{st['centre']:.3f})); the total weight of persona situations (quartiles) "
                   f"goes from {_q(u)} to {_q(c)}, no-persona rows at <= 0.2 from "
                   f"{u['none_hit']:.0%} to {c['none_hit']:.0%}.")
    es = rec.get("early_stopping")
    if es and all(v for v in es.values()):
        out.append("Early stopping kept each expert at step " +
                   ", ".join(f"{p} {v['step']}" for p, v in es.items()) +
                   f" of {rec['recipe']['steps']}.")
    out += _stage_lines(rec)
    return [" ".join(out), ""] if out else []


def _stage_lines(rec: dict) -> list[str]:
    """The served weights trained on, and what the preference and joint stages kept."""
    out = []
    sv = rec.get("served")
    if sv:
        out.append(f"Trained on {sv['weights']} ({sv.get('device', 'cpu')}"
                   f"{', 8-bit activation rounding' if sv.get('round_activations') else ''}).")
    pr = rec.get("preference")
    if pr:
        kept = [p for p, v in pr.items() if v.get("kept")]
        out.append(f"Preference stage (DPO on the expert's own samples) kept for {len(kept)} of "
                   f"{len(pr)} experts" + (f" ({', '.join(kept)})" if kept else "") +
                   "; reverted where the validation score fell.")
    j = rec.get("joint")
    if j:
        b, a = j["validation_before"], j["validation_after"]
        out.append(f"Joint stage ({j['steps']} steps): held-out loss {b['loss']:.3f} -> "
                   f"{a['loss']:.3f} (routing KL {b['router']:.4f} -> {a['router']:.4f}), "
                   + ("kept." if j["kept"] else "reverted: the experts and router are the ones "
                      "before it."))
    return out


def _q(report: dict) -> str:
    return "/".join(f"{v:.2f}" for v in report["persona_strength_quartiles"])


def _separation_line(fams: dict) -> str:
    e, p = (fams[f]["statements"]["separation_sum"] for f in ("expert", "prompt"))
    ratio = f"{e / p:.2f}x" if p > 0 else "n/a (prompting's is not positive)"
    return (f"Statement separation sum of the experts against prompting's: {ratio} (goal > 3x).")


def _row(fam_name: str, fam: dict) -> str:
    st, rp = fam["statements"], fam["replies"]
    return (f"| {fam_name} | {st['moves_own_count']}/10 | {st['separated_count']}/5 | "
            f"{st['separation_sum']:.3f} | {st['specificity']:.2f} | "
            f"{rp['moves_own_count']}/10 | {rp['separated_count']}/5 | "
            f"{rp['separation_sum']:.3f} | {rp['specificity']:.2f} |")


def format_label(result: dict) -> str:
    """The weights a pf-eval JSON measured, for a column head: "q4_1 (default)", "fp32"."""
    w = (result.get("weights") or "default weights").split(" + ")[0]
    return w if result.get("quantize") else f"{w} (default)"


def readme_section(result: dict, json_path: str, plot_path: str | None, command: str,
                   sample_message: str | None = None, sample_poles=None,
                   compare: dict | None = None) -> str:
    """The README's Personas block from a pf-eval JSON; compare: another one (e.g. the same bank
    on fp32 weights) beside it in the goals table."""
    fams = result["families"]
    prov = result.get("provenance", {})
    commit = (prov.get("commit") or "unknown")[:10] + (" (dirty tree)" if prov.get("dirty") else "")
    rec = result.get("recipe") or {}
    lines = [START, "",
             f"Made by `{command}` at commit {commit}, {prov.get('date', '?')}"
             f"{_on(prov.get('cpu'))}; the numbers are "
             f"read from `{json_path}`.  Bank recipe: data sha256 "
             f"{str(rec.get('data_sha256'))[:12]}, trained at commit "
             f"{str(rec.get('commit'))[:10]} in {rec.get('train_seconds')} s "
             f"({rec.get('threads')} threads{_on(rec.get('cpu'))}).", "",
             *_recipe_lines(rec),
             "Trait expression on the held-out split (higher is better; goals in brackets):", "",
             "| condition | statements: own trait moved [>= 9/10] | traits separated [5/5] | "
             "separation sum | specificity [>= 1.5] | replies: own trait moved | "
             "traits separated | separation sum | specificity |",
             "|---|---|---|---|---|---|---|---|---|",
             _row("LoRA expert", fams["expert"]), _row("system prompt", fams["prompt"]), "",
             _separation_line(fams), ""]
    acc = result["classifier_heldout_accuracy"]
    lines += ["Statements: per-token log-likelihood shift of held-out self-descriptions "
              "(train/metrics.py); replies: greedy replies to held-out messages scored "
              "by bag-of-words "
              "trait classifiers fitted on the train split (held-out accuracy " +
              ", ".join(f"{t} {acc[t]:.2f}" for t in TRAITS) + ").", ""]
    ppl = result["perplexity"]
    worst = max((k for k in ppl["ratio"] if k != "base"), key=lambda k: ppl["ratio"][k])
    q = result["quality"]
    degen = sum(v["degenerate"] for v in q.values())
    n = sum(v["n"] for v in q.values())
    d2 = {fam: sum(v["distinct2"] for k, v in q.items() if k.startswith(fam)) /
          max(1, sum(1 for k in q if k.startswith(fam))) for fam in ("expert", "prompt")}
    fam_degen = {fam: (sum(v["degenerate"] for k, v in q.items() if k.startswith(fam)),
                       sum(v["n"] for k, v in q.items() if k.startswith(fam)))
                 for fam in ("base", "expert", "prompt")}
    loopy = sorted((k for k in q if k.startswith("expert:") and q[k]["degenerate"]),
                   key=lambda k: -q[k]["degenerate"])
    lines += [f"Guards: perplexity of held-out neutral replies, base {ppl['ppl']['base']:.2f}, "
              f"worst expert {worst} {ppl['ppl'][worst]:.2f} ({ppl['max_ratio']:.2f}x base; goal "
              f"<= 1.1x); distinct-2 of generated replies base {q['base']['distinct2']:.2f}, "
              f"experts {d2['expert']:.2f}, prompted {d2['prompt']:.2f}.  Degenerate greedy "
              f"replies (under 3 words, or a word 3-gram repeated 3 times; goal: none): {degen} "
              f"of {n}; " + ", ".join(f"{fam} {a}/{b}" for fam, (a, b) in fam_degen.items()) +
              ("; by expert: " + ", ".join(f"{k[7:]} {q[k]['degenerate']}/{q[k]['n']}"
                                          for k in loopy) if loopy else "") + ".", ""]
    r = result.get("router")
    if r:
        lines += [f"Router (`persona=\"auto\"`): a target pole in the top 2 for "
                  f"{r['top2_agreement']:.0%} of {r['situations']} held-out situations (goal >= "
                  f"90%); {r['distinct_top2']} distinct top-2 sets, mean gate std "
                  f"{r['mean_std']:.3f}.  Per category: " +
                  ", ".join(f"{c} {v:.0%}" for c, v in r["per_category"].items()) + ".", ""]
    if result.get("usefulness"):
        lines += usefulness_lines(result)
    lines += goals.retention_lines(result)
    cols = {format_label(result): result}
    if compare is not None:
        cols[format_label(compare)] = compare
    lines += goals.goals_lines(cols, None if rec.get("quick") else rec)
    if plot_path:
        lines += [f"![trait x pole shifts]({plot_path})", ""]
    replies = result["replies"]
    mid = sample_message or sorted(result["messages"])[0]
    poles = sample_poles or ["agreeableness+", "agreeableness-", "extraversion+"]
    chosen = (f" (chosen by `{result['sample_chosen_by']}`)" if result.get("sample_chosen_by")
              else "")
    lines += ["Sample greedy replies to the held-out message "
              f"*\"{result['messages'][mid]}\"*{chosen}:", ""]
    for cond in ["base"] + [f"expert:{p}" for p in poles]:
        text = replies[cond].get(mid, "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"- **{cond}**: {text}")
    lines += ["", END]
    return "\n".join(lines)


def _cell(text: str, n: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[:n - 1] + "…"


def usefulness_lines(result: dict) -> list[str]:
    """The usefulness table (base, auto, experts, prompting), the goals' figures, and the
    side-by-side base / auto replies."""
    u = result["usefulness"]
    rep, facts = u["replies"], u["facts"]
    fams = {"base": ["base"], "auto": ["auto"],
            "experts at 1.0": [k for k in rep if k.startswith("expert:")],
            "system prompt": [k for k in rep if k.startswith("prompt:")]}

    def avg(keys, f):
        return sum(f(k) for k in keys) / len(keys)
    lines = ["Usefulness on the held-out split (replies to held-out messages, greedy unless "
             "said; relevance: cosine of message and reply under all-MiniLM-L6-v2, an encoder "
             "this project did not train; experts and prompts: the mean over the ten poles, "
             "worst pole in brackets):", "",
             "| condition | relevance | words on open requests (x base) | items | facts "
             "correct | degenerate, greedy | degenerate, sampled |",
             "|---|---|---|---|---|---|---|"]
    for fam, keys in fams.items():
        if not keys or keys[0] not in rep:
            continue
        worst_rel = min(keys, key=lambda k: rep[k]["relevance"])
        worst = f" ({worst_rel.split(':')[-1]} {rep[worst_rel]['relevance']:.3f})" \
            if len(keys) > 1 else ""
        deg_g = sum(rep[k]["degenerate_greedy"] for k in keys)
        deg_s = sum(rep[k]["degenerate_sampled"] for k in keys)
        n = sum(rep[k]["n"] for k in keys)
        fc = sum(facts[k]["correct"] for k in keys)
        fn = sum(facts[k]["n"] for k in keys)
        lines.append(f"| {fam} | {avg(keys, lambda k: rep[k]['relevance']):.3f}{worst} | "
                     f"{avg(keys, lambda k: rep[k]['words']):.1f} "
                     f"({avg(keys, lambda k: rep[k]['words_vs_base']):.2f}x) | "
                     f"{avg(keys, lambda k: rep[k]['items']):.1f} | {fc}/{fn} | {deg_g}/{n} | "
                     f"{deg_s}/{n} |")
    sit, st = u["situations"], u["strength"]
    samp = result.get("sampling", {})
    lines += ["", "Sampled: the chat defaults "
              f"({', '.join(f'{k} {v}' for k, v in samp.get('default', {}).items())}; "
              f"{samp.get('default_source', '')}).  Where the situation calls for a trait, "
              f"`auto` moves the target's leading pole above the base model in {sit['moved']} of "
              f"{sit['situations']} held-out situations ({sit['moved_share']:.0%}; goal >= 80%), "
              f"relevance {sit['relevance_auto']:.3f} against the base model's "
              f"{sit['relevance_base']:.3f}{_lead_reach(sit)}.  Where no persona is called "
              f"for, the total persona "
              f"weight under `auto` is <= {st['all']['threshold']} for {st['all']['low']} of "
              f"{st['all']['n']} prompts ({st['all']['low_share']:.0%}; goal >= 90%: " +
              ", ".join(f"{k} {v['low']}/{v['n']}" for k, v in st.items() if k != "all") +
              f"; mean {st['all']['mean']:.2f}).", "",
              "Base and `auto` side by side (greedy, held-out prompts):", "",
              "| prompt | auto gates | base | auto |", "|---|---|---|---|"]
    for row in u["side_by_side"]:
        g = row.get("gates") or {}
        gates = ", ".join(f"{k} {v:.2f}" for k, v in g.get("weights", {}).items())
        lines.append(f"| {_cell(row['prompt'], 120)} ({row['kind']}) | {gates or '-'} | "
                     f"{_cell(row['base'])} | {_cell(row['auto'])} |")
    return lines + [""] + draws.lines(u)


def _lead_reach(sit: dict) -> str:
    """How often the leading pole's own conditions move it (usefulness.situation_measures)."""
    names = {"expert": "its expert at 1.0", "prompt": "its system prompt"}
    parts = [f"{names[k]} in {v['moved']} ({v['moved_share']:.0%}; relevance "
             f"{v['relevance']:.3f})" for k, v in sit.get("lead", {}).items()]
    return "; the leading pole is moved as well by " + " and by ".join(parts) if parts else ""


def update_readme(readme: str, section: str) -> None:
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if START in text and END in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        raise PFError(f"{readme} has no {START} ... {END} markers for the Personas section")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)
