"""Smoke test of benchmarks/bench_scoring.py on a tiny chat model: every row scores every
prompt, the rows agree with transformers, and the JSON is well formed (no timing assertions)."""
import json
import math

import pytest

pytest.importorskip("httpx")

from benchmarks import bench_scoring  # noqa: E402


def test_bench_scoring_writes_wellformed_json(tiny_chat_model, tmp_path, capsys):
    folder, _ = tiny_chat_model
    out = tmp_path / "scoring.json"
    assert bench_scoring.main(["--model", folder, "--prompts", "5", "--min-len", "3",
                               "--max-len", "9", "--batch", "2", "--repeats", "1",
                               "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["rows"]] == list(bench_scoring.ROWS)
    for r in data["rows"]:
        assert math.isfinite(r["prompts_per_s"]) and r["prompts_per_s"] > 0
        assert r["max_abs_logprob_diff_vs_transformers"] < 1e-3, r
    assert data["machine"]["commit"] and "| http |" in capsys.readouterr().out
