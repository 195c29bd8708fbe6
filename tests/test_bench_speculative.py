"""bench_speculative's goals, table and README line from synthetic results, each goal met and
missed, and its forced-miss drafter (the benchmark itself runs the bundled model by hand)."""
import importlib

from benchmarks import bench_speculative

headline = importlib.import_module("benchmarks.report.headline")


def result(edit=1.6, missed=1.0, equal="4/4"):
    rows = {name: {"off_tok_s": 100.0, "on_tok_s": 100.0 * x, "speedup": x}
            for name, x in (("editing", edit), ("open", 1.3), ("counting", 1.2), ("missed", missed))}
    return {"machine": {"cpu": "test cpu", "commit": "abc", "dirty": []}, "weights": {"q4_1": 1},
            "rounds": 3, "new_tokens": 256, "draft": 4, "rows": rows,
            "acceptance": {n: {"drafted": 10, "accepted": 5} for n in rows},
            "equal": {"base": equal, "explicit top-2": "4/4", "auto": "4/4"}}


def test_goals_met_and_missed():
    assert all(ok for _, _, ok in bench_speculative.goals(result()))
    assert [ok for _, _, ok in bench_speculative.goals(result(1.4, 0.9, "3/4"))] == \
        [False, False, False, True, True]
    md = bench_speculative.markdown(result())
    assert "| editing | 100.0 | 160.0 | 1.60x | 10 | 5 |" in md and "**missed**" not in md
    line = headline.speculative(result(edit=1.4))[0]
    assert "1.40x faster (goal 1.5x: **missed**)" in line and "tokens equal" in line
    assert "**not** equal" in headline.speculative(result(equal="3/4"))[0]


def test_forced_misses_replace_the_drafts_only_when_on():
    from pf_engine.runtime import speculative
    real = speculative.propose
    forced = bench_speculative.ForcedMisses(7)
    try:
        seq = [1, 2, 3, 1, 2]
        assert speculative.propose(seq, 2) == real(seq, 2) == [3, 1]
        forced.on = True
        assert speculative.propose(seq, 3) == [7, 7, 7]
    finally:
        speculative.propose = real
