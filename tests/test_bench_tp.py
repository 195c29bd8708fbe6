"""bench_tp's report from a synthetic result (the benchmark itself runs ranks by hand)."""
from benchmarks import bench_tp
from benchmarks.report.headline import tensor_parallel


def _rows():
    rows = {}
    for i, (k, (ranks, threads, allreduce, head, quantize, base)) in enumerate(bench_tp.ROWS.items()):
        decode = 50.0 if ranks == 1 else 60.0 + 40 * i
        rows[k] = {"ranks": ranks, "allreduce": allreduce, "head": head, "quantize": quantize, "baseline": base,
                   "threads": threads, "prefill_tok_s": 100.0 + i, "decode_ms_per_token": decode,
                   "decode_vs_baseline": decode / 50.0, "prefill_vs_baseline": 1.0,
                   "greedy8_equal_baseline": i != 7,
                   "allreduce_bytes_per_decode_step": 0 if ranks == 1 else 335000,
                   "weight_bytes_rank0_per_decode_step": 2.76e8}
    return rows


def test_markdown_and_headline():
    res = {"machine": {"cpu": "test cpu", "commit": "abc", "dirty": []}, "model": "m", "prompt_tokens": 44,
           "new_tokens": 32, "rounds": 3, "rows": _rows(),
           "samples": {k: [(0.1, 0.001 * r["decode_ms_per_token"]), (0.1, 0.001 * (r["decode_ms_per_token"] + 2))]
                       for k, r in _rows().items()}}
    md = bench_tp.markdown(res)
    assert "| 1 rank x 2 threads | 100 | 50.0 (50.0-52.0) |  |  |  | 276 MB |" in md, md
    assert "| 1 rank x 1 thread | 101 | 50.0 (50.0-52.0) | 1.00x | True |  | 276 MB |" in md, md
    assert ("| 2 ranks x 1 thread, shm, head sharded | 102 | 140.0 (140.0-142.0) | 2.80x | True | 335 kB | 276 MB |"
            in md), md
    assert "| 2 ranks x 1 thread, shm, head sharded, q4 | 107 | 340.0 (340.0-342.0) | 6.80x | False |" in md, md
    (line,) = tensor_parallel(res)
    assert "140.0 ms/token with shared-memory all-reduces against 50.0" in line and "2.80x the time" in line
    assert "220.0 through gloo (4.40x), 6.80x on 4-bit weights" in line and "1 thread alone: 50.0" in line
    assert "220.0 through gloo (4.40x)" in line and "335 kB" in line and "greedy tokens equal" in line, line
