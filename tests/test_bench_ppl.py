"""benchmarks/bench_ppl.py on a tiny GGUF: its perplexity is exp(mean NLL) of the second halves of
non-overlapping windows, recomputed here from Engine.logits in float64; llama.cpp's (where
llama_cpp is importable) agrees on the fp32 file.  And ppl_text's reader of R's lazy-load
database, on a database written here byte by byte."""
import gzip
import json
import math
import struct
import zlib

import pytest
import torch

from benchmarks import bench_ppl, ppl_text

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered as the rightful property of "
        "some one or other of their daughters.\n") * 3
CTX, WINDOWS = 48, 3


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    from gguf_fixtures import write_tiny_gguf
    monkeypatch.setenv("PF_HOME", str(tmp_path / "home"))
    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, tied=False, seed=7)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return str(model), str(text)


def reference_ppl(model: str, text: str) -> float:
    """exp(mean NLL) of tokens CTX/2+1 .. CTX-1 of each window, from full logits in float64."""
    from pf_engine import Engine
    eng = Engine.from_pretrained(model, progress=False)
    ids = eng.tokenizer.fast.encode(open(text, encoding="utf-8").read(), add_special_tokens=False).ids
    first, nll, n = CTX // 2, 0.0, 0
    for k in range(WINDOWS):
        w = torch.tensor(ids[k * CTX:(k + 1) * CTX])
        lp = torch.log_softmax(eng.logits([w.tolist()])[0].double(), -1)     # (CTX, V)
        nll -= lp[first:CTX - 1].gather(1, w[first + 1:, None]).sum().item()
        n += CTX - 1 - first
    return math.exp(nll / n)


def test_ppl_is_second_half_mean_nll(tiny, tmp_path, capsys):
    model, text = tiny
    out = tmp_path / "ppl.json"
    argv = ["--model", model, "--text", text, "--ctx", str(CTX), "--windows", str(WINDOWS),
            "--no-peer", "--out", str(out)]
    assert bench_ppl.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["scored_tokens"] == WINDOWS * (CTX - 1 - CTX // 2) and res["bos"] is None
    want = reference_ppl(model, text)
    assert res["pf_engine"]["ppl"] == pytest.approx(want, rel=1e-5)
    assert math.isfinite(res["pf_engine"]["tokens_per_s"]) and res["pf_engine"]["tokens_per_s"] > 0
    assert res["llama_cpp"] is None and res["machine"]["cpu"]
    assert "| pf_engine |" in capsys.readouterr().out


def test_too_short_text_is_one_line(tiny):
    model, text = tiny
    with pytest.raises(SystemExit, match="windows of 4096 need"):
        bench_ppl.run(["--model", model, "--text", text, "--ctx", "4096", "--windows", "2",
                       "--no-peer"])


def test_llama_cpp_agrees_on_fp32_file(tiny):
    pytest.importorskip("llama_cpp")
    model, text = tiny
    res = bench_ppl.run(["--model", model, "--text", text, "--ctx", str(CTX),
                         "--windows", str(WINDOWS)])
    assert res["llama_cpp"]["tokenizer_first_difference"] is None
    assert res["ppl_ratio"] == pytest.approx(1.0, abs=1e-3), res
    assert res["pf_engine"]["ppl"] == pytest.approx(reference_ppl(model, text), rel=1e-5)


# R's XDR serialization, written from R's serialize.c: flags = type | attr 1<<9 | tag 1<<10.
def _int(v):
    return struct.pack(">i", v)


def _chars(s):
    return _int(9) + (_int(-1) if s is None else _int(len(s.encode())) + s.encode())


def _strs(items, names=None):
    return _vec(16, b"".join(_chars(s) for s in items), len(items), names)


def _vec(kind, body, n, names=None, refs=None):
    if names is None:
        return _int(kind) + _int(n) + body
    sym = _int(1) + _chars("names") if not refs else _int((1 << 8) | 255)   # a REFSXP after
    if refs is not None:                                                    # the first use
        refs.append("names")
    attr = _int(2 | 1 << 10) + sym + _strs(names) + _int(254)
    return _int(kind | 1 << 9) + _int(n) + body + attr


def _serialize(obj_bytes):
    return b"X\n" + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b"UTF-8" + obj_bytes


def test_r_lazyload_database_reader(tmp_path):
    books = {"emma": ["EMMA", "", "Emma Woodhouse, handsome, clever, and rich,", None],
             "persuasion": ["Persuasion", "Sir Walter Elliot"]}
    rdb, offsets = b"", {}
    for name, lines in books.items():
        raw = _serialize(_strs(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = (len(rdb), len(blob))
        rdb += blob
    refs = []
    pairs = [_vec(13, _int(o) + _int(n), 2) for o, n in offsets.values()]
    variables = _vec(19, b"".join(pairs), len(pairs), list(offsets), refs)
    index = _vec(19, variables + _vec(10, _int(1), 1), 2, ["variables", "compressed"], refs)
    root = tmp_path / ppl_text.DATA
    root.parent.mkdir(parents=True)
    (tmp_path / (ppl_text.DATA + ".rdx")).write_bytes(gzip.compress(_serialize(index)))
    (tmp_path / (ppl_text.DATA + ".rdb")).write_bytes(rdb)
    got = ppl_text.read_books(str(tmp_path))
    assert got == {"emma": "EMMA\n\nEmma Woodhouse, handsome, clever, and rich,\n\n",
                   "persuasion": "Persuasion\nSir Walter Elliot\n"}
