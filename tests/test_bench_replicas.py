"""bench_replicas' goals, table and README line from synthetic results, each goal met and missed
(the benchmark itself runs the bundled model on Ray by hand)."""
import importlib

from benchmarks import bench_replicas

headline = importlib.import_module("benchmarks.report.headline")


def result(rr_hit=0.5, aff_hit=0.8, rr_ttft=1.0, aff_ttft=0.5, hung=0, replaced=20.0):
    def row(mode, replicas, router, hit, ttft):
        return {"mode": mode, "replicas": replicas, "router": router, "ttft_p50_s": ttft,
                "ttft_p99_s": 2 * ttft, "requests_per_s": 0.6, "hit_rate": hit,
                "decisions": {"persona": 5, "prefix": 3, "load": 1, "new": 2}}
    rows = [row("one", 1, "affinity", 0.9, 0.4), row("round-robin", 2, "round-robin", rr_hit,
                                                      rr_ttft),
            row("affinity", 2, "affinity", aff_hit, aff_ttft)]
    return {"machine": {"cpu": "test cpu", "commit": "abc", "dirty": []}, "threads": 2,
            "requests": 32, "rate": 0.5, "variants": 1, "rows": rows, "replies_equal": True,
            "hit_rate_ratio": aff_hit / rr_hit, "ttft_ratio": rr_ttft / aff_ttft,
            "fault": {"requests": 64, "answered": 33, "failed": 31, "hung": hung,
                      "probes_failed": 0, "replaced_after_s": replaced}}


def test_goals_met_and_missed():
    assert all(ok for _, _, ok in bench_replicas.goals(result()))
    bad = bench_replicas.goals(result(aff_hit=0.6, aff_ttft=1.2, hung=1))
    assert [ok for _, _, ok in bad] == [False, False, True, False]
    assert not bench_replicas.goals(result(replaced=31.0))[-1][2]
    md = bench_replicas.markdown(result())
    assert "| affinity | 2 | affinity | 0.50 | 1.00 | 0.60 | 0.80 | 5 / 3 / 1 / 2 |" in md
    assert "| round-robin | 2 | round-robin |" in md and "**missed**" not in md
    line = headline.replicas(result(aff_hit=0.6))[0]
    assert "60% of the prompt tokens" in line and "(1.20x; goal 1.5x: **missed**)" in line
    assert "replaced after 20 s (goal 30 s: met)" in line
