"""Smoke test of the serving benchmark on a tiny chat model: the stream runs through every
configuration at every rate and the JSON is well formed (no timing assertions)."""
import json
import math

import pytest

from benchmarks import bench_serving


def test_bench_serving_writes_wellformed_json(tiny_chat_model, tmp_path, capsys):
    folder, _ = tiny_chat_model
    out = tmp_path / "serving.json"
    assert bench_serving.main(["--model", folder, "--requests", "4", "--rates", "200,100",
                               "--min-new", "2", "--max-new", "4", "--slots", "2",
                               "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rates"] == [100.0, 200.0] and data["prefill_budget"] == 128
    want = [(100.0, "continuous"), (100.0, "static"), (200.0, "continuous"), (200.0, "static"),
            (200.0, "continuous-base"), (200.0, "continuous-naive")]
    assert [(r["rate"], r["run"]) for r in data["runs"]] == want
    stream = bench_serving.make_stream(4, 1.0, 2, 4, 0)
    for r in data["runs"]:                       # EOS is ignored: every request makes its budget
        assert r["requests"] == 4 and r["tokens"] == sum(s["max_new"] for s in stream)
        for k in ("throughput_tok_s", "engine_busy", "ttft_p99_s", "tpot_p50_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    assert [g["rate"] for g in data["goals"]] == [100.0, 200.0]
    for r in data["runs"]:       # static's steps: its batches' longest requests, >= tokens / slots
        assert ("decode_steps" in r) == (r["run"] == "static")
        if r["run"] == "static":
            assert max(s["max_new"] for s in stream) <= r["decode_steps"] <= r["tokens"]
    for g in data["goals"]:
        assert g["step_bound"] >= 1.0
    assert "persona_cost" in data["goals"][1] and "persona_cost" not in data["goals"][0]
    assert "| 200 | continuous-naive |" in capsys.readouterr().out


@pytest.mark.parametrize("rates", ["fast", "0,1", ""])
def test_bench_serving_refuses_bad_rates(rates, capsys):
    with pytest.raises(SystemExit) as e:
        bench_serving.main(["--rates", rates])
    assert e.value.code == 2 and f"--rates {rates!r}" in capsys.readouterr().err
