"""Smoke test of benchmarks/bench_http.py on a tiny chat model: both runs complete every request
over the real openai client and the JSON is well formed (no timing assertions)."""
import json
import math

import pytest

pytest.importorskip("openai")

from benchmarks import bench_http, bench_serving  # noqa: E402


def test_bench_http_writes_wellformed_json(tiny_chat_model, tmp_path, capsys):
    folder, _ = tiny_chat_model
    out = tmp_path / "http.json"
    assert bench_http.main(["--model", folder, "--requests", "4", "--rate", "50", "--min-new", "2",
                            "--max-new", "4", "--slots", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    want = sum(s["max_new"] for s in bench_serving.make_stream(4, 50, 2, 4, 0))
    assert [r["run"] for r in data["runs"]] == ["in-process", "http"]
    for r in data["runs"]:                       # EOS ignored: every request makes its budget
        assert r["requests"] == 4 and r["tokens"] == want, r
        assert all(math.isfinite(r[k]) for k in ("throughput_tok_s", "ttft_p50_s", "tpot_p50_s"))
    assert set(data["overhead"]) == {"ttft_p50_ms", "tpot_p50_ms", "throughput_ratio"}
    assert "| http |" in capsys.readouterr().out
