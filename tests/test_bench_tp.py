"""bench_tp's report from a synthetic result (the benchmark itself runs ranks by hand)."""
from benchmarks import bench_tp
from benchmarks.report.headline import tensor_parallel


def _row(prefill, decode):
    return {"prefill_tok_s": prefill, "decode_ms_per_token": decode, "decode_vs_1_rank": decode / 50.0,
            "prefill_vs_1_rank": prefill / 180.0}


def test_markdown_and_headline():
    rows = {bench_tp.ONE: _row(180.0, 50.0)}
    rows.update({k: _row(100.0 + i, 60.0 + 40 * i) for i, k in enumerate(bench_tp.TP_ROWS)})
    res = {"machine": {"cpu": "test cpu", "commit": "abc", "dirty": []}, "model": "m", "prompt_tokens": 44,
           "new_tokens": 32, "rounds": 3, "greedy8_equal": {k: True for k in bench_tp.TP_ROWS},
           "allreduce_bytes_per_decode_step": {"head sharded": 335000, "head replicated": 138240},
           "weight_bytes_rank0_per_decode_step": {"head sharded": 2.76e8, "head replicated": 3.32e8},
           "rows": rows}
    md = bench_tp.markdown(res)
    assert "| 2 ranks x 1 thread, shm, head sharded | 100 | 60.0 | 1.20x | True |" in md, md
    assert "head replicated: 138 kB against 332 MB" in md
    (line,) = tensor_parallel(res)
    assert "60.0 ms/token with shared-memory all-reduces against 50.0" in line and "1.20x the time" in line
    assert "140.0 through gloo (2.80x)" in line and "335 kB" in line, line
