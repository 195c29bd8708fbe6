"""bench_prefix_personas' and bench_deterministic's derived figures from synthetic results, the
goals met and missed both possible (the benchmarks themselves run the bundled model by hand)."""
import importlib

from benchmarks import bench_deterministic, bench_prefix_personas

headline = importlib.import_module("benchmarks.report.headline")   # the package exports a function


def stream(off=3.0, persona=2.0, split=1.0, equal=True, cached=100):
    times = (("off", off), ("persona", persona), ("split-pass", split * 1.5), ("split", split))
    med = {m: {"ttft_p50_s": t, "throughput_tok_s": 10.0,
               "ttft_p50_by_kind_s": {"auto": t, "base": t, "explicit": t}} for m, t in times}
    rows = [{"mode": m, "round": 0, "cached_tokens": cached, "prompt_tokens": 300,
             "shared_cached_tokens": 50} for m, _ in times]
    return {"median": med, "rows": rows, "replies_equal": equal, "off_over_split": off / split,
            "persona_over_split": persona / split, "pass_over_split": 1.5,
            "pass_replies_differ": 3}


def result(off=3.0, persona=2.0, split=1.0, equal=True, cached=100):
    return {"machine": {"cpu": "test cpu", "commit": "abc", "dirty": []}, "threads": 2,
            "weights": "q4_1", "requests": 24, "rate": 0.6, "split_layer": 18, "route_layer": 9,
            **stream(off, persona, split, equal), "auto": stream(off, persona, split, equal, cached)}


def test_goals_met_and_missed():
    g = {goal: (fig, ok) for goal, fig, ok in bench_prefix_personas.goals(result())}
    assert g["TTFT p50 >= 2x lower with the cache than without"] == ("3.00x", True)
    assert g["TTFT p50 >= 1.5x lower than the persona-keyed cache"] == ("2.00x", True)
    assert g["auto requests hit (auto on every request)"] == \
        ("100 of 300 prompt tokens reused", True)
    bad = bench_prefix_personas.goals(result(off=1.5, persona=1.2, equal=False, cached=0))
    assert not any(ok for _, _, ok in bad) and len(bad) == 5
    md = bench_prefix_personas.markdown(result())
    assert "| split | 1.00 |" in md and "**missed**" not in md
    assert "router's own pass / split 1.50x" in md and "3 of 24 replies part" in md and "| split-pass | 1.50 |" in md
    line = headline.prefix_personas(result(persona=1.2))[0]
    assert "3.00x lower than without" in line and "(goal 1.5x: **missed**)" in line


def test_deterministic_rows_and_headline():
    row = {"config": "base", "workload": "long", "prompt_tokens": 256,
           "default": {"prefill_tok_s": 500.0, "decode_ms_per_token": 20.0},
           "deterministic": {"prefill_tok_s": 450.0, "decode_ms_per_token": 20.5},
           "prefill_ratio": 0.9, "decode_ratio": 1.025}
    res = {"machine": {"cpu": "test cpu", "torch_threads": 2, "commit": "abc", "dirty": []},
           "weights": "float32", "rounds": 5, "new_tokens": 32, "rows": [row]}
    assert "| base | long | 256 | 500 | 450 | 0.900 |" in bench_deterministic.markdown(res)
    line = headline.deterministic(res)[0]
    assert "prefill 0.90-0.90x" in line and "10% slower: **missed**" in line
    row.update(prefill_ratio=0.95)
    assert "10% slower: met" in headline.deterministic(res)[0]
