"""Issue 34's goals read from pf-eval JSONs, one per weight format, and the retention table.

    figures = goal_figures(result)           # {goal: (value text, met?)} for one pf-eval JSON
    lines = goals_lines({"4-bit (default)": r_q4, "fp32": r_f32}, train_seconds)
    lines = retention_lines(result)          # reasoning, safety, social rows of one JSON

Every figure is computed here from the JSON, nothing is typed in: the README's Personas block
calls these (report.readme_section).
"""
from __future__ import annotations

import math

from pf_engine.train.data import TRAITS
from pf_engine.train.draws import first_draw

RECIPE_MINUTES = 45


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a share k/n (95% at the default z): how far a goal read off n
    situations can be from the share on many more."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def _moved(sit: dict) -> str:
    """The trait-moved share, with its count and 95% interval where the JSON has the count."""
    if "moved" not in sit:
        return f"{sit['moved_share']:.0%}"
    lo, hi = wilson(sit["moved"], sit["situations"])
    return (f"{sit['moved_share']:.0%} ({sit['moved']}/{sit['situations']}; 95% "
            f"{100 * lo:.0f}-{hi:.0%})")


def _experts(rows: dict) -> list[str]:
    return [k for k in rows if k.startswith("expert:")]


def _usefulness(u: dict) -> dict:
    """The usefulness goals; `auto`'s against the base model's read the mean over pf-eval's
    greedy draws (draws.py) where the JSON has more than one."""
    rep, sit = u["replies"], u["situations"]
    b, a = rep["base"], rep["auto"]
    ex = _experts(rep)
    ex_rate = sum(rep[k]["degenerate_greedy"] for k in ex) / max(1, sum(rep[k]["n"] for k in ex))
    b_rate = b["degenerate_greedy"] / b["n"]
    fig = _draw_figures(u)
    n, nf, tail = a["n"], u["facts"]["base"]["n"], fig.pop("tail")
    num = "{:.0f}" if not tail else "{:.1f}"

    def pair(k, fmt, per):
        return f"{fmt.format(fig[k + '_auto'])}{per} vs {fmt.format(fig[k + '_base'])}{per}{tail}"
    moved = _moved(sit) if not tail else (
        f"{fig['moved_share']:.0%}{tail}, {u['draws']['min']['moved_share']:.0%}-"
        f"{u['draws']['max']['moved_share']:.0%}")
    return {
        "auto relevance >= base": (pair("relevance", "{:.3f}", ""),
                                   fig["relevance_auto"] >= fig["relevance_base"]),
        "auto facts >= base": (pair("facts", num, f"/{nf}"),
                               fig["facts_auto"] >= fig["facts_base"]),
        "auto degenerate <= base": (pair("degenerate", num, f"/{n}"),
                                    fig["degenerate_auto"] <= fig["degenerate_base"]),
        "experts at 1.0 degenerate no more often than base": (
            f"{ex_rate:.0%} vs {b_rate:.0%}", ex_rate <= b_rate),
        "auto moves the called-for trait >= 80%": (moved, fig["moved_share"] >= 0.8)}


def _draw_figures(u: dict) -> dict:
    """draws.FIGURES for the goals: the mean over the draws (with "tail", the text that says
    so), or draw 0's from the JSON's usefulness figures when it has one draw."""
    d = u.get("draws")
    if d and d["n"] > 1:
        return {**d["mean"], "tail": f" (mean of {d['n']} draws)"}
    return {**first_draw(u), "tail": ""}


def _expression(fams: dict) -> dict:
    es, ps = fams["expert"]["statements"], fams["prompt"]["statements"]
    ratio = (es["separation_sum"] / ps["separation_sum"] if ps["separation_sum"] > 0
             else float("inf"))
    above = [t for t in TRAITS if es["separation"][t] > ps["separation"][t]]
    rp = fams["expert"]["replies"]
    return {
        "statements: separation sum >= 3x prompting's": (f"{ratio:.2f}x", ratio >= 3),
        "statements: every trait above prompting's": (f"{len(above)}/5", len(above) == 5),
        "replies: 5/5 traits separated": (f"{rp['separated_count']}/5",
                                          rp["separated_count"] == 5)}


def _retention(r: dict) -> dict:
    out = {}
    rs = r.get("reasoning")
    if rs:
        rows = {k: v for k, v in rs["conditions"].items() if k != "base"}
        worst = min(rows, key=lambda k: min(rows[k]["mc_vs_base"]["diff"],
                                            rows[k]["arith_vs_base"]["diff"]))
        w = rows[worst]
        lo = min(w["mc_vs_base"]["diff"], w["arith_vs_base"]["diff"])
        out["reasoning within 2 points of base"] = (
            f"{sum(v['ok'] for v in rows.values())}/{len(rows)} (worst {worst} {lo:+.1f})",
            all(v["ok"] for v in rows.values()))
    sf = r.get("safety")
    if sf:
        out["harmful refusal not below base"] = _refusal_goal(sf)
    return out


def _refusal_goal(sf: dict) -> tuple[str, bool]:
    """Each condition's harmful refusal against the base's: draw 0's, or with safety draws
    (draws.safety_draws) their mean counts."""
    d = sf.get("draws")
    if d:
        n, means = d["prompts"]["harmful"], d["mean"]
        diff = {k: 100 * (m["harmful"] - means["base"]["harmful"]) / n
                for k, m in means.items() if k != "base"}
        note = f", mean of {d['n']} draws"
    else:
        diff = {k: v["vs_base"]["harmful"] for k, v in sf["conditions"].items() if k != "base"}
        note = ""
    low = min(diff, key=diff.get)
    return (f"{sum(v >= 0 for v in diff.values())}/{len(diff)} (lowest {low} "
            f"{diff[low]:+.1f} pts{note})", all(v >= 0 for v in diff.values()))


def goal_figures(result: dict) -> dict[str, tuple[str, bool]]:
    """{goal: (the figure as text, met?)} for one pf-eval JSON (the goals it has data for)."""
    out = {}
    if result.get("usefulness"):
        out.update(_usefulness(result["usefulness"]))
    out.update(_expression(result["families"]))
    if result.get("retention"):
        out.update(_retention(result["retention"]))
    return out


def goals_lines(results: dict[str, dict], recipe: dict | None) -> list[str]:
    """A goals table, one column per weight format ({label: pf-eval JSON}); recipe: the bank's
    recipe metadata (its training time and the stages it ran), None for a quick bank."""
    figs = {label: goal_figures(r) for label, r in results.items()}
    goals = list(dict.fromkeys(g for f in figs.values() for g in f))
    lines = ["Issue 34's goals, per weight format (**missed** in bold):", "",
             "| goal | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for g in goals:
        cells = []
        for label in results:
            text, ok = figs[label].get(g, ("-", True))
            cells.append(text if ok else f"**{text}**")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    if recipe and recipe.get("train_seconds") is not None:
        start = recipe.get("continued_from") or {}         # a bank made in two runs: both
        m = (recipe["train_seconds"] + (start.get("train_seconds") or 0)) / 60
        stages = ["supervised"] + [s.replace("_", " ") for s in
                                   ("preference", "joint", "routed_preference") if recipe.get(s)]
        cell = f"{m:.0f} min" if m < RECIPE_MINUTES else f"**{m:.0f} min**"
        lines.append(f"| the recipe that made this bank < {RECIPE_MINUTES} min on "
                     f"{recipe.get('threads', '?')} threads ({' + '.join(stages)}) | {cell} |"
                     + " |" * (len(results) - 1))
    return lines + [""]


def retention_lines(result: dict) -> list[str]:
    """Reasoning, safety and social rows for base, auto and the experts (mean, worst)."""
    r = result.get("retention")
    if not r:
        return []
    rs = r["reasoning"]["conditions"]
    lines = ["Retention (train/retention.py; data/evals/ written for the project): reasoning by "
             f"lm-evaluation-harness {r['reasoning']['lm_eval']} through pf-serve (multiple "
             "choice by log-likelihood, arithmetic greedy; difference to base in points, paired, "
             "± standard error), refusals by phrase patterns on greedy chat replies" +
             (f" (mean of {r['safety']['draws']['n']} greedy draws, min-max)"
              if r["safety"].get("draws") else "") + ":", "",
             "| condition | multiple choice | arithmetic | harmful refused | benign refused |",
             "|---|---|---|---|---|"]
    for name in ["base", "auto"] + _experts(rs):
        if name not in rs:
            continue
        row = [f"{rs[name][t]:.1%}" + ("" if name == "base" else
                                       f" ({rs[name][t + '_vs_base']['diff']:+.1f} ± "
                                       f"{rs[name][t + '_vs_base']['se']:.1f})")
               for t in ("mc", "arith")]
        row += [_refusals(r["safety"], name, k) for k in ("harmful", "benign")]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    so = r.get("social")
    if so:
        a = so["conditions"]["auto"]
        lines += ["", f"Social-emotional tone ({so['scorer']}, a lexicon nobody here trained; "
                  f"valence, not empathy): on {so['situations']} held-out situations that call "
                  f"for a persona, `auto`'s replies score {a['compound']:.2f} against the base "
                  f"model's {so['conditions']['base']['compound']:.2f} (compound, -1..1), higher "
                  f"in {a['higher']:.0%} of them; by category: " +
                  ", ".join(f"{c} {v['higher']:.0%}" for c, v in a["by_category"].items()) + "."]
    return lines + [""]


def _refusals(sf: dict, name: str, kind: str) -> str:
    """A condition's refusals of one kind: "k/n" (one draw) or "mean/n (min-max)"."""
    s, d = sf["conditions"].get(name), sf.get("draws")
    if not s:
        return "-"
    if not d:
        return f"{round(s[kind]['refusal'] * s[kind]['n'])}/{s[kind]['n']}"
    c = d["counts"][name][kind]
    return f"{d['mean'][name][kind]:.1f}/{d['prompts'][kind]} ({min(c)}-{max(c)})"
