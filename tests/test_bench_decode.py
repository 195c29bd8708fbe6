"""Smoke test of benchmarks/bench_decode.py on a tiny chat model (no timing assertions)."""
import json
import math

from benchmarks import bench_decode


def test_bench_decode_writes_wellformed_json(tiny_chat_model, tmp_path):
    folder, _ = tiny_chat_model
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--model", folder, "--batches", "1,3", "--steps", "2", "--repeats", "1",
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(1, "dynamic"), (1, "static"), (3, "dynamic"),
                                                      (3, "static")]
    assert all(math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in rows)
