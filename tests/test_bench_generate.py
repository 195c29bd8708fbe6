"""Smoke test of the end-to-end benchmark harness on a tiny model: it runs and writes
well-formed JSON (no timing assertions: timings belong in benchmarks, not in pass/fail tests)."""
import json
import math
import os

from benchmarks import bench_generate, report
from benchmarks.report.common import plot_generate


def test_bench_generate_quick_writes_wellformed_json(tiny_chat_model, tmp_path):
    folder, _ = tiny_chat_model
    out = tmp_path / "bench_generate.json"
    result = bench_generate.run(["--model", folder, "--quick", "--new-tokens", "3", "--rank", "4",
                                 "--configs", "base,top2,mixed:torch", "--mixed-batches", "3",
                                 "--in-process", "--out", str(out)])
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
    by = {(r["engine"], r["config"], r["backend"], r["batch"]): r for r in rows}
    top2 = by[("pf_engine", "top2", "torch", 1)]           # ms added over the engine's own base
    assert math.isclose(top2["mixing_ms"], top2["decode_ms_per_token"]
                        - by[("pf_engine", "base", "-", 1)]["decode_ms_per_token"])
    peft = by[("transformers+peft (cat)", "top2", "-", 1)]
    assert math.isclose(peft["mixing_ms"], peft["decode_ms_per_token"]
                        - by[("transformers", "base", "-", 1)]["decode_ms_per_token"])
    assert "mixing_ms" not in by[("pf_engine", "base", "-", 1)]
    assert data["read_bandwidth_GBps"] > 0 and data["command"].startswith("python benchmarks/")
    # RESULTS.md, the README's headline block and the plot render from it
    readme, page = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text("# x\n\n## Performance\n\n" + report.START + "\nold\n" + report.END + "\n\n## After\n")
    report.write(str(tmp_path), str(readme), str(page), "python -m benchmarks --quick")
    assert "| pf_engine | top2 | torch | 1 |" in page.read_text()
    text = readme.read_text()
    assert "old" not in text and text.endswith("## After\n") and "](RESULTS.md)" in text
    assert "**Decode, bundled SmolLM2-135M-Instruct**" in text and "x faster than transformers" in text
    png = plot_generate(data, str(tmp_path / "plots" / "gen.png"))
    assert png and os.path.getsize(png) > 1000


def test_rows_run_in_their_own_process(tiny_chat_model, tmp_path):
    """By default each row is a child process: its peak RSS is its own, not the runs' before it."""
    folder, _ = tiny_chat_model
    out = tmp_path / "iso.json"
    result = bench_generate.run(["--model", folder, "--quick", "--new-tokens", "2", "--rank", "4",
                                 "--configs", "base,top2:torch", "--no-peers", "--out", str(out)])
    assert result["rss"].startswith("each row in its own process")
    rows = result["rows"]
    assert [(r["config"], r["backend"]) for r in rows] == [("base", "-"), ("top2", "torch")]
    for r in rows:
        assert "error" not in r, r
        # t_N - t_1 of a 2-token run on a tiny model can come out below zero on a busy machine:
        # a timing never decides a test, only that the figure was made
        assert r["peak_rss_mb"] > 0 and math.isfinite(r["decode_ms_per_token"])
