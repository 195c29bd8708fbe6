"""bench_prefix's derived figures: the goal table from a synthetic result, met and missed both
possible (the benchmark itself runs the bundled model by hand)."""
from benchmarks import bench_prefix


def result(on=0.2, off=1.0, tput=(30.0, 28.0), free=20.0, held=21.0):
    rows = [{"cache": True, "ttft_p50_s": on, "ttft_p99_s": 2 * on, "throughput_tok_s": tput[0],
             "hits": 12, "cached_tokens": 3000, "prompt_tokens": 4000},
            {"cache": False, "ttft_p50_s": off, "ttft_p99_s": 2 * off, "throughput_tok_s": tput[1]}]
    med = {"on": {"ttft_p50_s": on, "ttft_p99_s": 2 * on, "throughput_tok_s": tput[0]},
           "off": {"ttft_p50_s": off, "ttft_p99_s": 2 * off, "throughput_tok_s": tput[1]}}
    return {"machine": {"cpu": "test cpu"}, "threads": 2, "weights": "q4_1", "requests": 16, "rate": 0.6,
            "prompt_tokens_mean": 250.0, "new_tokens": 16, "rows": rows, "median": med,
            "ttft_p50_ratio": off / on, "throughput_ratio": tput[0] / tput[1],
            "structured": {"free_ms_per_token": free, "json_schema_ms_per_token": held, "ratio": held / free,
                           "replies": {"free": "Sure!", "json_schema": "{\"name\":\"Ann\"}"}}}


def test_goals_met_and_missed():
    g = {goal: (fig, ok) for goal, fig, ok in bench_prefix.goals(result())}
    assert g["TTFT p50 >= 3x lower with the prefix cache"] == ("5.00x", True)
    assert g["throughput not lower with the prefix cache"][1] is True
    assert g["structured decoding <= 1.15x free decoding per token"] == ("1.05x", True)
    bad = {goal: ok for goal, _, ok in bench_prefix.goals(result(on=0.5, tput=(27.0, 28.0), held=25.0))}
    assert not any(bad.values())
    md = bench_prefix.markdown(result())
    assert "| on | 0.20 |" in md and "json_schema" in md and "**missed**" not in md
