"""bench_tp's report from a synthetic result (the benchmark runs two ranks by hand)."""
from benchmarks import bench_tp
from benchmarks.report.headline import tensor_parallel


def test_markdown_and_headline():
    res = {"machine": {"cpu": "test cpu", "commit": "abc", "dirty": []}, "model": "m", "prompt_tokens": 44,
           "new_tokens": 32, "rounds": 3, "decode_ratio": 2.0, "greedy8_equal": True,
           "allreduce_bytes_per_decode_step": 138240, "weight_bytes_per_rank_per_decode_step": 3.3e8,
           "rows": {"1 rank x 2 threads": {"prefill_tok_s": 180.0, "decode_ms_per_token": 50.0},
                    "2 ranks x 1 thread": {"prefill_tok_s": 100.0, "decode_ms_per_token": 100.0}}}
    md = bench_tp.markdown(res)
    assert "| 2 ranks x 1 thread | 100 | 100.0 |" in md and "2.00x" in md and "138 kB" in md
    (line,) = tensor_parallel(res)
    assert "100.0 ms/token against 50.0" in line and "2.00x slower" in line
