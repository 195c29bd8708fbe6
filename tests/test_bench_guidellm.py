"""bench_guidellm's summary of a guidellm report, its goals (met and missed) and table, from
synthetic data (the benchmark itself runs guidellm against pf-serve by hand)."""
from benchmarks import bench_guidellm


def report(kind="synchronous", ok=16, errored=0, lo=32.0, hi=32.0):
    stat = lambda v: {"successful": {"median": v, "mean": v, "min": v, "max": v}}  # noqa: E731
    metrics = {"request_totals": {"successful": ok, "errored": errored, "incomplete": 0,
                                  "total": ok + errored},
               "output_token_count": {"successful": {"min": lo, "max": hi}},
               "prompt_token_count": stat(94.0), "time_to_first_token_ms": stat(120.0),
               "inter_token_latency_ms": stat(13.5), "output_tokens_per_second": stat(55.0),
               "requests_per_second": stat(1.7)}
    return {"benchmarks": [{"config": {"profile": {"kind": kind}}, "metrics": metrics}]}


def result(*rows):
    return {"guidellm": "guidellm version: 0.8.1", "requests": 16, "prompt_tokens": 64,
            "output_tokens": 32, "rows": [bench_guidellm.summary(r) for r in rows]}


def test_goals_met_and_missed():
    good = result(report(), report("concurrent"))
    assert all(ok for _, _, ok in bench_guidellm.goals(good))
    bad = result(report(ok=15, errored=1), report("concurrent", lo=20.0))
    assert [ok for *_, ok in bench_guidellm.goals(bad)] == [False, True, True, False]
    md = bench_guidellm.markdown(good)
    assert "| synchronous | 16 | 0 | 94 | 32 | 120 | 13.5 | 55.0 | 1.70 |" in md
    assert "**missed**" not in md
