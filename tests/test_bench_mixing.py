"""Smoke tests of benchmarks/bench_mixing.py on CPU: a tiny grid, the JSON's shape, and a backend
that disagrees with naive being refused.  No timing assertions."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_mixing  # noqa: E402
from pf_engine.backends.torch_backend import Torch
from pf_engine.backends.naive import Naive
from pf_engine.model.linear import Linear

TINY = ["--shapes", "tiny", "--K", "1,3", "--r", "4", "--T", "1,3", "--gates", "dense,top2",
        "--backends", "naive,torch", "--repeats", "2", "--warmup", "1", "--budget", "0.02",
        "--rotate-mb", "0", "--threads", "1"]
ROW_FIELDS = {"shape", "d_in", "d_out", "K", "r", "T", "gates", "backend", "status", "max_err_rel",
              "tol", "ms", "calls", "bytes", "GBps", "floor_ms", "floor_frac", "ratio_to_base",
              "naive_over_this", "active_experts", "copies", "threads"}


def test_tiny_grid_writes_well_formed_json(tmp_path):
    out = tmp_path / "mix.json"
    result = bench_mixing.run(TINY + ["--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    for key in ("benchmark", "machine", "device", "dtype", "threads", "config", "backend_status",
                "check_rule", "read_bandwidth_GBps", "busy", "command", "rows", "failures", "ok"):
        assert key in on_disk, key
    assert on_disk["ok"] is True and on_disk["failures"] == []
    assert on_disk["config"]["backends"] == ["base", "naive", "torch"]
    assert on_disk["read_bandwidth_GBps"] > 0 and on_disk["command"].startswith("python benchmarks/")
    rows = on_disk["rows"]
    shapes = {"tiny/qkv", "tiny/o", "tiny/gate_up", "tiny/down"}
    assert {w["shape"] for w in rows} == shapes
    # K=1: dense only (top-2 needs K >= 3); K=3: dense, top2-token, top2-seq; per T, per backend
    assert len(rows) == len(shapes) * 2 * (1 + 3) * 3
    for w in rows:
        assert ROW_FIELDS <= set(w), ROW_FIELDS - set(w)
        assert w["status"] == "ok", w
        assert w["ms"] > 0 and w["bytes"] > 0 and w["floor_ms"] > 0
        assert w["max_err_rel"] <= w["tol"]
    by = {(w["shape"], w["K"], w["T"], w["gates"], w["backend"]): w for w in rows}
    for (shape, K, T, gates, b), w in by.items():
        if b == "base":
            assert w["ratio_to_base"] == 1.0
        if b == "naive":
            assert w["naive_over_this"] == 1.0
    # the sequence-level pair reads 2 experts; bytes grow with the active experts
    seq = by[("tiny/o", 3, 3, "top2-seq", "torch")]
    dense = by[("tiny/o", 3, 3, "dense", "torch")]
    assert seq["active_experts"] == 2 and dense["active_experts"] == 3
    assert seq["bytes"] < dense["bytes"]
    assert by[("tiny/o", 3, 1, "dense", "torch")]["threads"].startswith("backend.policy")
    head = bench_mixing.markdown(on_disk, headline=True)
    assert "| tiny/qkv | 1 | top2-seq |" in head and "naive / torch" in head
    assert "| tiny/down | 3 | 4 | 3 | top2-token | torch |" in bench_mixing.markdown(on_disk)


def test_backend_that_disagrees_is_refused(tmp_path, monkeypatch):
    grouped = Torch.mixed

    def wrong(self, lin, x2, mix, decode):         # the torch backend, off by a little
        return grouped(self, lin, x2, mix, decode) * 1.001
    monkeypatch.setattr(Torch, "mixed", wrong)
    argv = TINY[:]
    argv[argv.index("--shapes") + 1] = "tiny/o"
    argv[argv.index("--K") + 1] = "3"
    argv[argv.index("--T") + 1] = "2"
    argv[argv.index("--gates") + 1] = "dense"
    out = tmp_path / "bad.json"
    result = bench_mixing.run(argv + ["--out", str(out)])
    assert result["ok"] is False and len(result["failures"]) == 1
    rows = {w["backend"]: w for w in json.loads(out.read_text())["rows"]}
    assert rows["torch"]["status"] == "FAILED check" and rows["torch"]["ms"] is None
    assert rows["torch"]["max_err_rel"] > rows["torch"]["tol"]
    assert rows["naive"]["status"] == "ok" and rows["base"]["status"] == "ok"
    assert bench_mixing.main(argv + ["--out", str(out)]) == 1
    assert bench_mixing.main(argv + ["--out", str(out), "--allow-fail"]) == 0


def test_bad_flags_are_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench_mixing.run(["--shapes", "gpt5"])
    assert e.value.code == 2
    assert "unknown shape 'gpt5'" in capsys.readouterr().err


def test_backend_that_raises_is_a_failed_row(tmp_path, monkeypatch):
    def boom(self, lin, x2, mix, decode):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(Torch, "mixed", boom)
    argv = ["--shapes", "tiny/down", "--K", "3", "--r", "4", "--T", "1", "--gates", "top2-seq",
            "--backends", "naive,torch", "--repeats", "2", "--warmup", "1", "--budget", "0.02",
            "--rotate-mb", "0", "--out", str(tmp_path / "boom.json")]
    result = bench_mixing.run(argv)
    rows = {w["backend"]: w for w in result["rows"]}
    assert rows["torch"]["status"] == "FAILED run: RuntimeError: kernel exploded"
    assert set(rows["torch"]) >= ROW_FIELDS and rows["torch"]["ms"] is None
    assert rows["naive"]["status"] == "ok" and not result["ok"]


@pytest.mark.parametrize("backend", ["naive", "base"])
def test_reference_is_independent_of_every_backend(tmp_path, monkeypatch, backend):
    """The check's y_ref is fp64 from pf_kernels' reference: a wrong naive backend (the old
    reference) or a wrong base projection fails its own row."""
    if backend == "naive":
        naive = Naive.mixed
        monkeypatch.setattr(Naive, "mixed",
                            lambda self, lin, x2, mix, decode: naive(self, lin, x2, mix, decode) * 1.001)
    else:
        full = Linear.full
        monkeypatch.setattr(Linear, "full", lambda self, x, mix=None: full(self, x, mix) * (
            1.001 if mix is None else 1.0))
    argv = TINY[:]
    for flag, value in (("--shapes", "tiny/o"), ("--K", "3"), ("--T", "2"), ("--gates", "dense")):
        argv[argv.index(flag) + 1] = value
    result = bench_mixing.run(argv + ["--out", str(tmp_path / "bad.json")])
    status = {w["backend"]: w["status"] for w in result["rows"]}
    assert status[backend] == "FAILED check", status
    assert all(s == "ok" for b, s in status.items() if b != backend), status


def test_busy_machine_warning_reaches_the_tables(tmp_path, monkeypatch):
    """Other processes busy on the cores during the run (CpuWatch) are recorded and the warning
    is printed in both tables; the benchmark's own work does not count."""
    from benchmarks import common
    assert common.busy_warning(0.1, cores=2) is None and common.busy_warning(None) is None
    watch = common.CpuWatch()
    sum(i * i for i in range(2_000_000))            # our own work: not "other processes"
    assert watch.other_cores() >= 0.0                # (a shared machine: no bound asserted)
    monkeypatch.setattr(common.CpuWatch, "other_cores", lambda self: 1.5)
    argv = TINY[:]
    for flag, value in (("--shapes", "tiny/o"), ("--K", "1"), ("--T", "1")):
        argv[argv.index(flag) + 1] = value
    result = bench_mixing.run(argv + ["--out", str(tmp_path / "busy.json")])
    assert result["other_cpu_cores"] == 1.5
    assert result["busy"].startswith("machine busy: other processes kept 1.50 of")
    for table in (bench_mixing.markdown(result), bench_mixing.markdown(result, headline=True)):
        assert "machine busy" in table
