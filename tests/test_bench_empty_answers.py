"""bench_empty_answers: the first answer token's end-of-text probability, per condition."""
import json

import pytest
import torch

from benchmarks import bench_empty_answers as bench


@pytest.fixture(scope="module")
def tiny_bank(tiny_chat_model, tmp_path_factory):
    from pf_engine.model.config import ModelConfig
    from pf_engine.persona.bank import AdapterBank
    folder = tiny_chat_model[0]
    bank = AdapterBank.random(ModelConfig.from_file(f"{folder}/config.json"), rank=4, seed=3,
                              expert_names=["a+", "a-"])
    path = tmp_path_factory.mktemp("bank") / "b.safetensors"
    bank.save(path)
    return folder, path


def test_rows_are_the_softmax_at_the_prompts_last_position(tiny_bank, tmp_path):
    """Each row: mean softmax[eos] and the argmax count, computed here from Engine.logits for
    the base and for an expert at 1.0 (which must differ from the base's)."""
    from pf_engine import Engine
    folder, path = tiny_bank
    out = tmp_path / "e.json"
    assert bench.main(["--bank", f"t={path}", "--model", folder, "--limit", "4",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["banks"]["t"]["conditions"]
    assert list(rows) == ["base", "expert:a+", "expert:a-"] and res["questions"] == 4
    eng = Engine.from_pretrained(folder, adapters=str(path), progress=False)
    eos = eng.tokenizer.hf.eos_token_id
    for name, persona in (("base", None), ("expert:a+", {"a+": 1.0})):
        ps = [torch.softmax(eng.logits([eng.tokenizer.encode(bench.PROMPT.format(q=q))],
                                       persona=persona)[0, -1].double(), -1)
              for q in bench.questions(4)]
        assert rows[name]["p_end"] == pytest.approx(sum(float(p[eos]) for p in ps) / 4, abs=1e-6)
        assert rows[name]["argmax_end"] == sum(int(p.argmax()) == eos for p in ps)
    assert rows["base"]["p_end"] != rows["expert:a+"]["p_end"]
    assert res["machine"]["cpu"] and res["banks"]["t"]["digest"]


def test_bank_argument_needs_a_label():
    with pytest.raises(SystemExit):
        bench.main(["--bank", "nolabel"])
