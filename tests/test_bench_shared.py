"""Smoke test of the shared-machine benchmark on a tiny model: every row and condition is
measured, ratios and goals are computed, no busy process outlives the run, the table renders.
No timing assertions: timings belong in the benchmark, not in pass/fail tests."""
import json
import math
import os
import signal
import time

import pytest

from benchmarks import bench_shared


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_every_row_and_condition_and_no_busy_process_left(tiny_chat_model, tmp_path):
    folder, _ = tiny_chat_model
    out = tmp_path / "bench_shared.json"
    # one pf_engine row, no peer: three row processes (the peer's goals: test_goals_from_known_figures)
    result = bench_shared.run(["--model", folder, "--configs", "top2:cpu", "--no-peers", "--new-tokens",
                               "4", "--repeats", "1", "--inner-repeats", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result)) and data["complete"]
    assert data["machine"]["torch"] and "commit" in data["machine"] and "dirty" in data["machine"]
    assert data["sched_autogroup_enabled"] in (0, 1, None)
    assert data["command"].startswith("python benchmarks/bench_shared.py ")
    rows = {(r["engine"], r["config"], r["backend"], r["batch"]) for r in data["rows"]}
    assert rows == {("pf_engine", "top2", "cpu", 1)}

    ms = data["measurements"]          # one round: each row under each condition, in that order
    assert [(m["engine"], m["config"], m["condition"]) for m in ms] == \
        [("pf_engine", "top2", c) for c in bench_shared.CONDITIONS]
    me = os.getpid()
    for m in ms:
        assert "error" not in m, m
        assert math.isfinite(m["decode_ms_per_token"]) and m["wall_s"] > 0
        busy = m["busy"]
        assert len(busy) == {"quiet": 0, "two-nice": 2, "one-busy": 1}[m["condition"]]
        for b in busy:                 # its own session, the nice asked for, really running
            assert b["sid"] == b["pid"] != me
            assert b["nice"] == min(19, os.nice(0) + (19 if m["condition"] == "two-nice" else 0))
            assert b["cpu_s"] >= 0
    pids = [b["pid"] for m in ms for b in m["busy"]]
    assert data["busy_pids"] == pids and len(pids) == 3
    assert data["busy_left_running"] == [] and all(gone(p) for p in pids)

    summary = {s["engine"]: s for s in data["summary"]}
    assert list(summary) == ["pf_engine"]
    for s in summary.values():
        quiet = s["quiet"]["ms_per_token"]
        assert s["quiet"]["n"] == 1 and quiet == ms[0]["decode_ms_per_token"]
        for c in ("two-nice", "one-busy"):       # a ratio only of positive medians (4 tokens: noise)
            busy = s[c]["ms_per_token"]
            if quiet > 0 and busy > 0:
                assert s[c]["ratio"] > 0 and math.isclose(s[c]["ratio"], busy / quiet)
            else:
                assert s[c]["ratio"] is None
    goals = summary["pf_engine"]["goals"]
    assert [g["goal"] for g in goals] == ["two-nice <= 2.5x quiet", "one-busy <= 3x quiet",
                                          "two-nice <= transformers", "one-busy <= transformers"]
    for g in goals[:2]:
        assert g["met"] == (None if g["ratio"] is None else g["ratio"] <= g["limit"])
    assert [(g["peer_ratio"], g["met"]) for g in goals[2:]] == [(None, None)] * 2     # no peer
    assert data["all_goals_met"] == (False if False in [g["met"] for g in goals] else None)

    text = bench_shared.markdown(data)
    assert "| pf_engine top2:cpu |" in text and "n/a" in text
    assert sum(line.startswith("|") for line in text.splitlines()) == 3      # header, rule, the row


def test_goals_from_known_figures():
    """The ratio and goal arithmetic on made-up measurements (medians over rounds)."""
    pf = {"engine": "pf_engine", "config": "base", "backend": "-", "batch": 1}
    hf = {"engine": "transformers", "config": "base", "backend": "-", "batch": 1}
    figs = {("pf_engine", "quiet"): [10, 12, 11], ("pf_engine", "two-nice"): [20, 40, 30],
            ("pf_engine", "one-busy"): [31, 33, 32],
            ("transformers", "quiet"): [20, 20, 20], ("transformers", "two-nice"): [70, 70, 70],
            ("transformers", "one-busy"): [50, 50, 50]}
    ms = [{**spec, "condition": c, "decode_ms_per_token": float(v)}
          for spec in (pf, hf) for c in bench_shared.CONDITIONS for v in figs[(spec["engine"], c)]]
    ms.append({**pf, "condition": "quiet", "error": "timed out"})       # errors are left out
    s = {x["engine"]: x for x in bench_shared.summarise([pf, hf], ms)}
    assert s["pf_engine"]["quiet"] == {"n": 3, "ms_per_token": 11}
    assert s["pf_engine"]["two-nice"]["ratio"] == 30 / 11 and s["pf_engine"]["one-busy"]["ratio"] == 32 / 11
    met = {g["goal"]: g["met"] for g in s["pf_engine"]["goals"]}
    # 2.73x > 2.5x missed; 2.91x <= 3x met; 2.73x <= 3.5x met; 2.91x > 2.5x missed
    assert met == {"two-nice <= 2.5x quiet": False, "one-busy <= 3x quiet": True,
                   "two-nice <= transformers": True, "one-busy <= transformers": False}
    assert bench_shared.all_met(list(s.values())) is False
    no_peer = bench_shared.summarise([pf], ms)
    assert [g["met"] for g in no_peer[0]["goals"]][2:] == [None, None]
    noisy = [{**pf, "condition": c, "decode_ms_per_token": v}
             for c, v in (("quiet", -0.5), ("two-nice", 3.0), ("one-busy", 4.0))]   # t_N < t_1
    s = bench_shared.summarise([pf], noisy)[0]
    assert s["two-nice"]["ratio"] is None and {g["met"] for g in s["goals"]} == {None}


def test_timeout_kills_the_row_and_the_busy_processes(tiny_chat_model, tmp_path):
    folder, _ = tiny_chat_model
    result = bench_shared.run(["--model", folder, "--configs", "base", "--no-peers", "--new-tokens", "2",
                               "--repeats", "1", "--row-timeout", "0.3", "--out", str(tmp_path / "t.json")])
    assert [m["condition"] for m in result["measurements"]] == list(bench_shared.CONDITIONS)
    assert all(m["error"].startswith("timed out after 0.3 s") for m in result["measurements"])
    assert result["busy_left_running"] == [] and all(gone(p) for p in result["busy_pids"])
    assert result["summary"][0]["quiet"]["ms_per_token"] is None
    assert result["all_goals_met"] is None and "n/a" in bench_shared.markdown(result)


def test_interrupt_kills_the_busy_processes(monkeypatch):
    started = []

    def start(nices, into):
        real_start(nices, into)
        started.extend(into)
        return into

    def interrupted(*a):
        raise KeyboardInterrupt
    real_start = bench_shared.start_busy
    monkeypatch.setattr(bench_shared, "start_busy", start)
    monkeypatch.setattr(bench_shared, "measure_row", interrupted)
    spec = {"engine": "pf_engine", "config": "base", "backend": "-", "batch": 1}
    with pytest.raises(KeyboardInterrupt):
        bench_shared.measure([], spec, "two-nice", 10)
    assert len(started) == 2 and all(p.returncode is not None for p in started)
    assert not any(bench_shared.group_alive(p.pid) for p in started)


def test_an_interrupt_waits_for_the_end_of_a_deferred_block():
    """A Ctrl-C while a child is being started or killed is raised once that is done."""
    done, before = [], signal.getsignal(signal.SIGINT)   # SIG_IGN under a background shell
    with pytest.raises(KeyboardInterrupt):
        with bench_shared.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                 # the signal has arrived; the block goes on
            done.append(1)
    assert done == [1] and signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("argv, says", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--inner-repeats", "0"], "--inner-repeats must be at least 1"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--row-timeout", "0"], "--row-timeout must be positive"),
    (["--configs", "nope"], "unknown configuration 'nope'"),
    (["--configs", "top2:gpu"], "unknown backend 'gpu'"),
    (["--threads", "two"], "invalid int value"),
])
def test_bad_flags_are_one_line_errors(argv, says):
    with pytest.raises(SystemExit) as e:
        bench_shared.main(argv)
    msg = str(e.value)
    assert msg.startswith("bench_shared: ") and says in msg and "\n" not in msg
