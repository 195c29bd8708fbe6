"""Tensor parallelism across hosts (parallel/launch.py, parallel/channel.py; issue 38): two
torchrun agents on one machine stand in for two hosts, their ranks' gloo devices bound to
different loopback addresses (127.0.0.1 and 127.0.0.2, $PF_TP_HOST), meeting through torchrun's
c10d rendezvous.  Every rank runs the same script; only rank 0 gets an engine back.  Its logits
equal the 1-rank engine's within 1e-4 (fp32) and its greedy tokens are the same.  Slow (two
launchers)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from pf_engine import Engine
from pf_engine.parallel import launch

RANKS = '''
import json, os, sys
from pf_engine import Engine

if __name__ == "__main__":
    folder, out = sys.argv[1], sys.argv[2]
    eng = Engine.from_pretrained(folder, tensor_parallel=2, device="cpu", dtype="fp32",
                                 backend="torch", progress=False)
    logits = eng.logits([[1, 5, 9, 22, 7, 3]])
    tokens = eng.generate([[1, 5, 9, 22]], max_new_tokens=8)[0].token_ids
    with open(out, "w") as f:
        json.dump({"logits": logits.tolist(), "tokens": tokens}, f)
    eng.close()
    sys.stdout.flush()
    os._exit(0)        # past here only interpreter teardown, racing torchrun's store shutdown
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_ok(addr: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not loopback_ok("127.0.0.2"), reason="127.0.0.2 is not a loopback address here")
def test_two_torchrun_ranks_on_two_addresses_equal_one_rank(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama", "tp_torchrun", num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, hidden_size=64)
    script, out = tmp_path / "rank_script.txt", tmp_path / "out.json"
    script.write_text(RANKS)
    port, procs = free_port(), []
    for node, host in ((0, "127.0.0.1"), (1, "127.0.0.2")):
        env = dict(os.environ, PF_TP_HOST=host, OMP_NUM_THREADS="1", PF_TP_TIMEOUT_S="60")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
             "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "pf-test", "--local-addr", host, "--max-restarts", "0",
             str(script), folder, str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # A launcher may exit non-zero from torchrun's own exit barrier after its workers finished:
    # the agent hosting the rendezvous (node 0) can be gone first.  The workers' results decide.
    for p, log in zip(procs, logs):
        assert p.returncode == 0 or "_exit_barrier" in log, "\n---\n".join(logs)[-4000:]
    got = json.loads(out.read_text())
    one = Engine.from_pretrained(folder, device="cpu", dtype="fp32", backend="torch",
                                 progress=False)
    torch.testing.assert_close(torch.tensor(got["logits"]), one.logits([[1, 5, 9, 22, 7, 3]]),
                               atol=1e-4, rtol=0)
    assert got["tokens"] == one.generate([[1, 5, 9, 22]], max_new_tokens=8)[0].token_ids


def test_the_launchers_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    assert launch.torchrun_env() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch.torchrun_env() is None                   # not torchrun's
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    env = launch.torchrun_env()
    assert env == {"rank": 1, "world": 2, "addr": "127.0.0.1", "port": 29500}
    with pytest.raises(Exception, match="expected the launcher's WORLD_SIZE"):
        Engine.from_pretrained(None, tensor_parallel=3)
