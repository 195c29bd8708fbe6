"""Smoke test of benchmarks/bench_ab.py (two checkouts interleaved): this checkout against itself
on a tiny model, and the import shim for a checkout from before the pf_kernels/ rename.  No
timing assertions."""
import json
import math
import os

from benchmarks import bench_ab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ab_interleaves_both_sides(tiny_chat_model, tmp_path):
    folder, _ = tiny_chat_model
    out = tmp_path / "ab.json"
    res = bench_ab.run(["--old", ROOT, "--new", ROOT, "--configs", "base", "--rounds", "2",
                        "--new-tokens", "3", "--model", folder, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and res["complete"]
    sides = [(m["round"], m["side"]) for m in res["measurements"]]
    assert sides == [(0, "old"), (0, "new"), (1, "new"), (1, "old")]     # the pair alternates
    assert all("error" not in m for m in res["measurements"]), res["measurements"]
    (s,) = res["summary"]
    assert len(s["old_all"]) == len(s["new_all"]) == 2
    # a 3-token decode time is a difference of timings and may be noise below zero: the
    # ratio is only checked to be a number (timings never decide a test)
    assert s["ratio"] is None or math.isfinite(s["ratio"])
    assert s["quantize"] == "f32" and s["prefill_ratio"] > 0 and len(res["summary"]) == 1
    assert "| base | f32 | " in bench_ab.markdown(res)


def test_old_checkout_gets_a_pf_kernels_link(tmp_path):
    old = tmp_path / "old"
    (old / "kernels").mkdir(parents=True)
    path = bench_ab.import_path(str(old), str(tmp_path / "scratch")).split(os.pathsep)
    assert path[1] == str(old) and os.path.realpath(os.path.join(path[0], "pf_kernels")) == str(old / "kernels")
    new = tmp_path / "new"
    (new / "pf_kernels").mkdir(parents=True)
    assert bench_ab.import_path(str(new), str(tmp_path / "scratch")) == str(new)
