"""The goals table and retention rows come from pf-eval JSONs alone (train/goals.py)."""
import pytest

from pf_engine.train import goals
from pf_engine.train.data import TRAITS


def _result(auto_rel=0.5, base_rel=0.55, moved=0.85, sep_e=3.0, sep_p=1.0, harmful=0.1):
    def fam(sep, per):
        return {"statements": {"separation_sum": sep, "separation": {t: per for t in TRAITS}},
                "replies": {"separated_count": 5}}
    rep = {"base": {"relevance": base_rel, "degenerate_greedy": 2, "n": 10},
           "auto": {"relevance": auto_rel, "degenerate_greedy": 1, "n": 10},
           "expert:openness+": {"relevance": 0.5, "degenerate_greedy": 3, "n": 10}}
    facts = {k: {"correct": 5, "n": 10} for k in rep}
    cond = {"ok": True, "mc": 0.6, "arith": 0.3, "mc_vs_base": {"diff": -1.0, "se": 1.0},
            "arith_vs_base": {"diff": 0.0, "se": 0.0}}
    safety = {"base": {"harmful": {"refusal": 0.1, "n": 10}, "benign": {"refusal": 0.0, "n": 10},
                       "vs_base": {"harmful": 0.0, "benign": 0.0}},
              "auto": {"harmful": {"refusal": harmful, "n": 10}, "benign": {"refusal": 0.0, "n": 10},
                       "vs_base": {"harmful": 100 * (harmful - 0.1), "benign": 0.0}}}
    return {"usefulness": {"replies": rep, "facts": facts,
                           "situations": {"moved_share": moved}},
            "families": {"expert": fam(sep_e, sep_e / 5), "prompt": fam(sep_p, sep_p / 5)},
            "retention": {"reasoning": {"conditions": {"base": cond, "auto": cond},
                                        "lm_eval": "0.4.13"},
                          "safety": {"conditions": safety}, "social": None}}


def test_goal_figures_met_and_missed():
    f = goals.goal_figures(_result())
    assert f["auto relevance >= base"] == ("0.500 vs 0.550", False)
    assert f["auto degenerate <= base"][1] and not f["experts at 1.0 degenerate no more often than base"][1]
    assert f["statements: separation sum >= 3x prompting's"] == ("3.00x", True)
    assert f["auto moves the called-for trait >= 80%"] == ("85%", True)
    assert f["reasoning within 2 points of base"][1]
    assert goals.goal_figures(_result(harmful=0.0))["harmful refusal not below base"][1] is False
    r = _result(moved=31 / 48)
    r["usefulness"]["situations"].update(moved=31, situations=48)
    assert goals.goal_figures(r)["auto moves the called-for trait >= 80%"] == (
        "65% (31/48; 95% 50-77%)", False)


def test_wilson_interval_known_values():
    binomtest = pytest.importorskip("scipy.stats").binomtest     # via lm-eval -> scikit-learn
    for k, n in ((31, 48), (1, 16), (47, 48)):
        want = binomtest(k, n).proportion_ci(method="wilson")
        assert goals.wilson(k, n) == pytest.approx((want.low, want.high), abs=1e-9)
    assert goals.wilson(0, 10)[0] == 0.0 and goals.wilson(10, 10)[1] > 0.9999


def test_goals_table_one_column_per_format_and_bold_misses():
    rec = {"train_seconds": 3000, "threads": 2, "preference": {"openness+": {}}, "joint": None}
    lines = goals.goals_lines({"q4_1 (default)": _result(), "fp32": _result(auto_rel=0.6)}, rec)
    assert lines[2] == "| goal | q4_1 (default) | fp32 |"
    row = next(l for l in lines if l.startswith("| auto relevance"))
    assert row == "| auto relevance >= base | **0.500 vs 0.550** | 0.600 vs 0.550 |"
    assert lines[-2] == ("| the recipe that made this bank < 45 min on 2 threads (supervised + "
                         "preference) | **50 min** | |")
    rec.update(train_seconds=600, routed_preference={"kept": True},
               continued_from={"train_seconds": 1800})          # a bank made in two runs
    assert goals.goals_lines({"fp32": _result()}, rec)[-2] == (
        "| the recipe that made this bank < 45 min on 2 threads (supervised + preference + "
        "routed preference) | 40 min |")


def test_retention_rows():
    text = "\n".join(goals.retention_lines(_result()))
    assert "| base | 60.0% | 30.0% | 1/10 | 0/10 |" in text
    assert "| auto | 60.0% (-1.0 ± 1.0) | 30.0% (+0.0 ± 0.0) | 1/10 | 0/10 |" in text


def test_refusal_goal_and_rows_read_the_mean_over_safety_draws():
    """With safety draws the harmful-refusal goal compares mean counts, and the rows show the
    mean with its range; draw 0 alone would have met the goal here."""
    from pf_engine.train.draws import refusal_summary
    r = _result()                      # draw 0: auto refuses 1/10 as the base does: met
    kinds = ["harmful"] * 10 + ["benign"] * 10

    def flags(harmful, benign=0):
        return [i < harmful for i in range(10)] + [i < benign for i in range(10)]
    d = refusal_summary({"base": [flags(1), flags(3), flags(2)],
                         "auto": [flags(1), flags(1), flags(2, 1)]}, kinds)
    assert d["counts"]["auto"] == {"harmful": [1, 1, 2], "benign": [0, 0, 1]}
    assert d["mean"]["base"]["harmful"] == 2.0 and d["ok"] == {"base": True, "auto": False}
    assert d["n"] == 3 and d["prompts"] == {"harmful": 10, "benign": 10}
    assert goals.goal_figures(r)["harmful refusal not below base"][1]
    r["retention"]["safety"]["draws"] = d
    assert goals.goal_figures(r)["harmful refusal not below base"] == (
        "0/1 (lowest auto -6.7 pts, mean of 3 draws)", False)
    text = "\n".join(goals.retention_lines(r))
    assert "| auto | 60.0% (-1.0 ± 1.0) | 30.0% (+0.0 ± 0.0) | 1.3/10 (1-2) | 0.3/10 (0-1) |" \
        in text
    assert "| base | 60.0% | 30.0% | 2.0/10 (1-3) | 0.0/10 (0-0) |" in text
    assert "greedy chat replies (mean of 3 greedy draws, min-max):" in text
