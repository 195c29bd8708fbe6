"""Smoke test of the end-to-end benchmark harness on a tiny model: it runs and writes
well-formed JSON (no timing assertions: timings belong in benchmarks, not in pass/fail tests)."""
import json
import math
import os

from benchmarks import bench_generate, report


def test_bench_generate_quick_writes_wellformed_json(tiny_chat_model, tmp_path):
    folder, _ = tiny_chat_model
    out = tmp_path / "bench_generate.json"
    result = bench_generate.run(["--model", folder, "--quick", "--new-tokens", "3", "--rank", "4",
                                 "--configs", "base,top2,mixed:torch", "--mixed-batches", "3",
                                 "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["machine"]["torch"] and data["bank"] == {"experts": 10, "rank": 4, "modules": 7}
    rows = data["rows"]
    want = {("pf_engine", "base", "-", 1), ("pf_engine", "top2", "torch", 1),
            ("pf_engine", "top2", "naive", 1), ("pf_engine", "mixed", "torch", 3),
            ("transformers", "base", "-", 1), ("transformers+peft (cat)", "top2", "-", 1),
            ("peft x-lora", "token", "-", 1)}
    assert {(r["engine"], r["config"], r["backend"], r["batch"]) for r in rows} == want
    for r in rows:
        if r["engine"] == "peft x-lora" and "error" in r:
            continue        # X-LoRA is reported "where it runs"; its error is the row
        assert "error" not in r, r
        for k in ("decode_tok_s", "prefill_tok_s", "decode_ms_per_token") + \
                (("vs_base",) if r["batch"] == 1 else ()):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
    naive = next(r for r in rows if r["backend"] == "naive")
    assert math.isfinite(naive["naive_over_torch"])
    # the README section and the plot render from it
    text = report.section(str(tmp_path), str(tmp_path), "python -m benchmarks --quick")
    assert text.startswith(report.START) and text.endswith(report.END)
    assert "| pf_engine | top2 | torch | 1 |" in text
    png = report.plot_generate(data, str(tmp_path / "plots" / "gen.png"))
    assert png and os.path.getsize(png) > 1000
