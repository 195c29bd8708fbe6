"""bench_cpu's derived figures: the goal table is computed from the rows, met and missed both
possible (a synthetic result; the benchmark itself needs llama.cpp's converter and runs by hand)."""
from benchmarks import bench_cpu
from benchmarks.report.headline import cpu_formats


def result(ours_q4=10.0, peer_q4=12.0, rss=380.0):
    rows = [{"engine": "pf_engine", "format": "q4_1", "persona": "base", "prefill_tok_s": 200.0,
             "decode_ms_per_token": ours_q4, "floor_ms_per_token": 5.0, "over_floor": ours_q4 / 5.0},
            {"engine": "pf_engine", "format": "q4_1", "persona": "top2", "bank": "rank16", "experts": "q8",
             "prefill_tok_s": 190.0,
             "decode_ms_per_token": ours_q4 * 1.05},
            {"engine": "pf_engine", "format": "q4_1", "persona": "dense10", "bank": "rank16", "experts": "q8",
             "prefill_tok_s": 150.0,
             "decode_ms_per_token": ours_q4 * 1.5},
            {"engine": "llama.cpp", "format": "q4_1", "persona": "base", "prefill_tok_s": 150.0,
             "decode_ms_per_token": peer_q4},
            {"engine": "llama.cpp", "format": "q4_1", "persona": "2 LoRAs (top2)", "prefill_tok_s": 140.0,
             "decode_ms_per_token": peer_q4 * 1.3},
            {"engine": "llama.cpp", "format": "q4_1", "persona": "10 LoRAs (dense10)", "prefill_tok_s": 90.0,
             "decode_ms_per_token": peer_q4 * 3.5}]
    return {"machine": {"cpu": "test cpu", "commit": "abc1234", "dirty": []}, "threads": 2,
            "prompt_tokens": 44, "new_tokens": 32, "repeats": 5, "read_bandwidth_GBps": 20.0,
            "peer": "llama-cpp-python 0.3.36", "rows": rows,
            "quality": {"q4_1": {"ppl_pf": 11.5, "ppl_llama": 11.4, "ppl_ratio": 11.5 / 11.4,
                                 "greedy16_same_as_fp32": "9/16"}},
            "peak_rss_mb": {"q4_1": rss, "f32": 1000.0}}


def test_goals_met_and_missed():
    g = {goal: (fig, met) for goal, fig, met in bench_cpu.goals(result())}
    assert g["q4_1 decode <= 0.95x llama.cpp"] == ("0.83x (10.0 vs 12.0 ms/token)", True)
    assert g["q4_1 decode within 1.3x its read floor"][1] is False          # 2.00x
    assert g["top-2 persona <= 1.10x base (q4_1, rank 16, q8 experts)"][1] is True
    assert g["dense persona (10) <= 1.35x base (q4_1, rank 16, q8 experts)"][1] is False
    assert g["top-2 >= 1.3x faster than llama.cpp with 2 LoRAs"][1] is True      # 15.6 / 10.5
    assert g["dense >= 2x faster than llama.cpp with 10 LoRAs"] == ("2.80x", True)
    assert g["q4_1 perplexity within 1% of llama.cpp's"][1] is True
    assert g["q4_1 greedy 16 tokens = dequantized fp32 run on most prompts"] == ("9/16", True)
    slow = {goal: met for goal, _, met in bench_cpu.goals(result(ours_q4=12.0, peer_q4=12.0, rss=420.0))}
    assert slow["q4_1 decode <= 0.95x llama.cpp"] is False
    assert slow["peak RSS, bundled model in 4-bit, < 400 MB"] is False


def test_markdown_and_headline_read_the_rows():
    res = result()
    md = bench_cpu.markdown(res)
    assert "| pf_engine | q4_1 | base | 200 | 10.0 | 5.0 | 2.00x |" in md
    assert "| q4_1 decode <= 0.95x llama.cpp | 0.83x (10.0 vs 12.0 ms/token) | met |" in md
    line = cpu_formats(res)[0]
    assert "q4_1 10.0 vs 12.0 ms/token (0.83x)" in line and "380 MB" in line and "commit abc1234" in line
