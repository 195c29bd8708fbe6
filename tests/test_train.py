"""Persona post-training: the corpus checks, the cached-trunk maths, pf-train, pf-eval's metrics."""
import json
import math
import os
import shutil

import pytest
import torch

from pf_engine.train import metrics
from pf_engine.train.data import TRAITS, default_data_dir, load_corpus
from pf_engine.train.sequences import Sequence, pad_batch

DATA = default_data_dir()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data_copy(tmp_path):
    dst = tmp_path / "personas"
    shutil.copytree(DATA, dst)
    return dst


# The shipped corpus -------------------------------------------------------------------------------
def test_shipped_corpus_is_complete_and_split():
    c = load_corpus(DATA)
    assert c.poles == ["openness+", "openness-", "conscientiousness+", "conscientiousness-",
                       "extraversion+", "extraversion-", "agreeableness+", "agreeableness-",
                       "neuroticism+", "neuroticism-"]
    tr, ho = c.train, c.heldout
    assert not set(tr.messages) & set(ho.messages)
    for p in c.poles:
        assert len(tr.replies[p]) == len(tr.messages) and len(ho.replies[p]) == len(ho.messages)
        assert not set(tr.statements[p]) & set(ho.statements[p])
    assert not {s["text"] for s in tr.situations} & {s["text"] for s in ho.situations}
    assert not {q for q, _ in tr.neutral} & {q for q, _ in ho.neutral}
    for s in tr.situations + ho.situations:
        assert abs(sum(s["target"].values()) - 1) < 1e-6


@pytest.mark.parametrize("mutate, words", [
    (lambda d: os.remove(d / "train" / "replies.jsonl"), "missing data file"),
    (lambda d: _edit_line(d / "train" / "statements.jsonl", 3, '{"pole": "openness+", "text": '),
     "statements.jsonl:3: not valid JSON"),
    (lambda d: _edit_line(d / "train" / "statements.jsonl", 5,
                          '{"pole": "humility+", "text": "I am modest."}'),
     "statements.jsonl:5: unknown pole 'humility+'"),
    (lambda d: _edit_line(d / "train" / "situations.jsonl", 2, json.dumps(
        {"id": "s002", "category": "distress", "text": "I lost my job today.",
         "target": {"agreeableness+": 0.6, "neuroticism-": 0.6}})),
     "situations.jsonl:2: target mix sums to 1.2, expected 1"),
    (lambda d: _edit_line(d / "train" / "messages.jsonl", 1, '{"id": "m002"}'),
     "messages.jsonl:1: missing field 'text'"),
])
def test_bad_corpus_gives_one_line_and_no_bank(data_copy, tmp_path, capsys, mutate, words):
    from pf_engine.cli.train import main
    mutate(data_copy)
    out = tmp_path / "bank.safetensors"
    assert main(["--data", str(data_copy), "-o", str(out), "--quick", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pf-train: error: ") and words in err, err
    assert not out.exists()


def _edit_line(path, n, text):
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_existing_output_is_refused_untouched(tmp_path, capsys):
    from pf_engine.cli.train import main
    out = tmp_path / "bank.safetensors"
    out.write_bytes(b"keep me")
    assert main(["-o", str(out), "--quick", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"


def test_interrupted_training_leaves_no_bank(tmp_path, tiny_chat_model, monkeypatch, capsys):
    from pf_engine.cli.train import main
    from pf_engine.train import recipe
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [], None
    monkeypatch.setattr(recipe, "train_expert", interrupt)
    out = tmp_path / "bank.safetensors"
    assert main(["-o", str(out), "--model", tiny_chat_model[0], "--quick", "-q"]) == 130
    assert "no bank was written" in capsys.readouterr().err
    assert len(calls) == 3 and os.listdir(tmp_path) == []


# The cached trunk equals the whole model ----------------------------------------------------------
def test_pad_batch_marks_reply_targets():
    ids, targets, mask = pad_batch([Sequence([5, 6, 7], [8, 9]), Sequence([1], [2])])
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert targets[0].tolist()[:4] == [6, 7, 8, 9]
    assert mask.tolist() == [[False, False, True, True, False], [True, False, False, False, False]]


def test_chat_encoder_default_system(tiny_chat_model, converted_smollm2):
    from pf_engine.tokenizer import Tokenizer
    from pf_engine.train.sequences import ChatEncoder, system_prompt
    assert ChatEncoder(Tokenizer(tiny_chat_model[0]).hf).default_system() is None
    enc = ChatEncoder(Tokenizer(converted_smollm2).hf)
    default = enc.default_system()
    assert default.startswith("You are a helpful AI assistant named SmolLM")
    # prompted = the base model's own system prompt plus the description, nothing else
    text = enc.hf.decode(enc.prompt("hi", system_prompt("Calm and steady.", default)))
    assert text == enc.hf.decode(enc.prompt("hi")).replace(
        default, default + ". Your personality: Calm and steady.")
    seq = enc.sequence("hi", "Hello there.")
    assert seq.prompt == enc.prompt("hi") and seq.reply[-1] == enc.end


@pytest.mark.parametrize("first", [0, 1])
def test_trunk_log_likelihood_equals_full_model_with_adapter(tiny_chat_model, first):
    from peft import LoraConfig, get_peft_model

    from pf_engine.train.experts import Item, Trunk, load_hf_model
    model = load_hf_model(tiny_chat_model[0])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     layers_to_transform=list(range(first, 2)), lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    seqs = [Sequence([3, 17, 40, 2, 99], [12, 13, 4]), Sequence([7, 8], [200, 201, 4])]
    items = [Item(s) for s in seqs]
    trunk = Trunk(model, first)
    with pm.disable_adapter():              # the trunk below `first` is never adapted
        trunk.cache(items)
    ids, targets, mask = pad_batch(seqs)
    with torch.no_grad():
        full = torch.log_softmax(pm(input_ids=ids).logits, -1)
        full = torch.gather(full, 2, targets.unsqueeze(-1))[..., 0]
        want = (full * mask).sum(1) / mask.sum(1)
        got = trunk.log_likelihood(items)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), pm.disable_adapter():
        assert (trunk.log_likelihood(items) - got).abs().max() > 1e-3   # the adapter is live


# The router trainer --------------------------------------------------------------------------------
def _separable(classes: int, N: int, layer: int, seed: int, d: int = 16, L: int = 3):
    """Row classes [N] and pooled features [N, L+1, d] where only ``layer`` knows the class."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.arange(N) % classes
    centers = torch.randn(classes, d, generator=g) * 3
    feats = torch.randn(N, L + 1, d, generator=g) * 0.3 + 5.0
    feats[:, layer] += centers[cls]
    return cls, feats


def test_router_learns_separable_situations():
    from pf_engine.train.router import train_router
    N, K = 60, 10
    cls, feats = _separable(3, N, layer=2, seed=1)       # only layer 2 knows the class
    mixes = torch.zeros(3, K)
    mixes[0, [0, 3]] = torch.tensor([0.7, 0.3])
    mixes[1, [4, 6]] = torch.tensor([0.6, 0.4])
    mixes[2, [9, 1]] = torch.tensor([0.5, 0.5])
    router, rep = train_router(feats, mixes[cls], layers=[0, 2], steps=200, hidden=16)
    assert rep["layer"] == 2 and rep["cv"]["2"]["top2_hit"] == 1.0
    gates = router(feats[:, 2].unsqueeze(1))             # pooled over one token: itself
    assert ((gates > 0).sum(1) == 2).all()
    top = gates.topk(2, dim=1).indices
    assert all(set(top[i].tolist()) == set(mixes[cls[i]].nonzero()[:, 0].tolist())
               for i in range(N))


def test_router_with_none_learns_when_no_persona_is_called_for():
    """Four separable classes: three call for a mix at strength 0.75, one for no persona."""
    from pf_engine.train.router import train_router
    K = 10
    cls, feats = _separable(4, 80, layer=1, seed=2)
    t = torch.zeros(4, K + 1)
    t[0, [0, 3]] = torch.tensor([0.7, 0.3]) * 0.75
    t[1, [4, 6]] = torch.tensor([0.6, 0.4]) * 0.75
    t[2, [9, 1]] = torch.tensor([0.5, 0.5]) * 0.75
    t[:3, K] = 0.25
    t[3, K] = 1.0                                           # no persona
    router, rep = train_router(feats, t[cls], layers=[0, 1], steps=300, hidden=16, none=True)
    assert router.none and router.num_experts == K
    assert rep["layer"] == 1 and rep["cv"]["1"]["none_hit"] == 1.0
    assert rep["cv"]["1"]["top2_hit"] == 1.0 and rep["cv"]["0"]["none_hit"] < 1.0
    strength = router(feats[:, 1].unsqueeze(1)).sum(1)
    assert (strength[cls == 3] <= 0.2).all()
    assert ((strength[cls != 3] - 0.75).abs() < 0.15).all()


def test_strength_calibration_lifts_unsure_persona_rows_and_keeps_none_rows_low():
    """Held-out persona probabilities spread below the trained strength (0.2..0.7), none rows
    sit near 0: the fitted curve gives persona rows about the scale and none rows little."""
    from pf_engine.persona.router import total_weight
    from pf_engine.train.router import fit_strength
    g = torch.Generator().manual_seed(4)
    q = torch.cat([0.2 + 0.5 * torch.rand(40, generator=g),          # persona rows
                   1e-4 * torch.rand(30, generator=g)])               # none rows
    persona = torch.arange(70) < 40
    cal = fit_strength(q, persona, scale=0.75)
    assert cal["scale"] == 0.75 and cal["slope"] > 0
    w = total_weight(1 - q, cal)
    assert (w[persona] > 0.65).all() and (w[~persona] < 0.1).all()
    assert (q[persona] < 0.65).any()                                   # uncalibrated: too weak


def test_train_router_calibrates_on_held_out_folds():
    from pf_engine.train.router import train_router
    K = 10
    cls, feats = _separable(2, 60, layer=1, seed=5)
    t = torch.zeros(2, K + 1)
    t[0, [2, 5]] = torch.tensor([0.5, 0.25])
    t[0, K], t[1, K] = 0.25, 1.0
    router, rep = train_router(feats, t[cls], layers=[1], steps=200, hidden=16, none=True,
                               strength_scale=0.75)
    cal = rep["calibration"]
    assert router.strength == cal["strength"] and cal["strength"]["scale"] == 0.75
    assert cal["calibrated"]["none_hit"] == 1.0
    assert min(cal["calibrated"]["persona_strength_quartiles"]) > 0.6
    strength = router(feats[:, 1].unsqueeze(1)).sum(1)
    assert (strength[cls == 1] <= 0.2).all() and (strength[cls == 0] > 0.6).all()
    plain, rep = train_router(feats, t[cls], layers=[1], steps=200, hidden=16, none=True)
    assert plain.strength is None and "calibration" not in rep


# pf-eval's metrics on fixtures with known answers ---------------------------------------------------
def _shift(on: float, off: float, flip: str | None = None):
    out = {}
    for t in TRAITS:
        for s in "+-":
            p = t + s
            sgn = 1 if s == "+" else -1
            out[p] = {u: (sgn * on if u == t else off) for u in TRAITS}
    if flip:
        out[flip][flip[:-1]] *= -1
    return out


def test_expression_summary_known_matrix():
    s = metrics.expression_summary(_shift(0.6, 0.2))
    assert s["moves_own_count"] == 10 and s["separated_count"] == 5
    assert s["separation_sum"] == pytest.approx(5 * 1.2)
    assert s["specificity"] == pytest.approx(3.0)
    s = metrics.expression_summary(_shift(0.6, -0.3, flip="openness-"))
    assert s["moves_own_count"] == 9 and not s["moves_own"]["openness-"]
    assert s["separation"]["openness"] == pytest.approx(0.0)
    assert s["specificity"] == pytest.approx(2.0)


def test_trait_scores_and_perplexity():
    ll = {p: [-1.0] for t in TRAITS for p in (t + "+", t + "-")}
    ll["extraversion+"] = [-0.5, -0.7]
    s = metrics.trait_scores(ll)
    assert s["extraversion"] == pytest.approx(0.4) and s["openness"] == 0
    assert metrics.perplexity([-2.0, -4.0], [2, 4]) == pytest.approx(math.e)


def test_router_agreement_and_spread():
    gates = [{"a": 0.6, "b": 0.4}, {"c": 0.5, "d": 0.5}, {"a": 0.9, "e": 0.1}]
    targets = [{"b": 1.0}, {"a": 0.5, "b": 0.5}, {"e": 0.3, "f": 0.7}]
    assert metrics.top2_agreement(gates, targets) == pytest.approx(2 / 3)
    spread = metrics.gate_spread(gates, ["a", "b", "c", "d", "e", "f"])
    assert spread["distinct_top2"] == 3 and spread["mean_std"] > 0
    assert metrics.gate_spread([gates[0]] * 4, list("abcdef")) == {"distinct_top2": 1,
                                                                   "mean_std": 0.0}


def test_distinct_and_degenerate():
    assert metrics.distinct_n(["a b a b"]) == pytest.approx(2 / 3)
    assert metrics.distinct_n(["a b", "a b"]) == pytest.approx(0.5)
    assert metrics.degenerate("ok") and metrics.degenerate("I am here. " * 3)
    assert not metrics.degenerate("That sounds like a lovely plan for the weekend.")


def test_trait_classifier_separates_known_words():
    pos = [f"I love parties and people {i}" for i in range(10)]
    neg = [f"I prefer quiet evenings alone {i}" for i in range(10)]
    clf = metrics.TraitClassifier(pos, neg)
    assert clf.accuracy(["parties with people"], ["quiet alone"]) == 1.0
    p = clf.prob(["people parties", "quiet evenings", "unrelated words"])
    assert p[0] > 0.65 and p[1] < 0.35 and abs(p[2] - 0.5) < 0.05     # unseen words: the prior


# pf-train --quick and the shipped bank ----------------------------------------------------------
@pytest.fixture(scope="module")
def quick_bank(tmp_path_factory, converted_smollm2):
    from gguf_fixtures import _SESSION  # the converted bundled model of this session
    from pf_engine.cli.train import main
    folder = tmp_path_factory.mktemp("quick_bank")
    out = folder / "quick.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PF_HOME", _SESSION["home"])
        assert main(["-o", str(out), "--quick", "-q", "--peft-dir", str(folder / "peft"),
                     "--safety", "1", "--val-safety", "2"]) == 0
    return out


def test_quick_train_end_to_end(quick_bank, bundled_pf_home, capsys):
    from pf_engine import Engine
    from pf_engine.persona.bank import AdapterBank
    from pf_engine.cli.bank import main as bank_main
    bank = AdapterBank.load(quick_bank)
    assert bank.expert_names[0] == "openness+" and bank.num_experts == 10
    assert bank.router is not None and bank.router.top_k == 2
    assert bank.dtype == torch.float16
    rec = bank.recipe
    assert rec["quick"] and rec["data_sha256"] == load_corpus(DATA, ("train",)).digest["train"]
    assert set(rec["versions"]) >= {"torch", "transformers", "peft"} and "commit" in rec
    assert rec["cpu"] and rec["threads"] >= 1          # the machine it trained on
    peft = quick_bank.parent / "peft"     # the experts in PEFT format, as stacked into the bank
    assert sorted(d for d in os.listdir(peft) if (peft / d).is_dir()) == sorted(bank.expert_names)
    assert (peft / "openness+" / "adapter_config.json").is_file()
    eng = Engine.from_pretrained(adapters=str(quick_bank), progress=False, device="cpu", dtype="fp32")
    out = eng.generate("My exam is tomorrow.", chat=True, persona="auto", max_new_tokens=3)[0]
    assert out.gates["kind"] == "sequence" and len(out.gates["weights"]) == 2
    # the router has its none output, and the gates carry the strength it leaves the experts
    assert bank.router.none and 0 < out.gates["strength"] < 1
    assert out.gates["strength"] == pytest.approx(sum(out.gates["weights"].values()), abs=1e-5)
    # the recipe's other parts ran: base replies generated and filtered, early stopping
    br = rec["base_replies"]
    assert br["generated"] >= br["kept"] >= 1 and set(br["dropped"]) == {
        "degenerate", "irrelevant", "wrong_fact"}
    assert set(rec["early_stopping"]) == set(bank.expert_names)
    assert all(v["step"] == 2 and {"relevance", "degenerate", "trait"} <= set(v)
               for v in rec["early_stopping"].values())
    assert len(rec["validation_messages"]) == 2
    # trained on the base as served by default: the bundled 4-bit file, activations rounded
    assert rec["served"]["weights"].startswith("q4_1 + q8_0 embedding") and rec["served"]["quantize"] is None
    assert rec["served"]["round_activations"] is True
    # the preference stage ran for every expert and reported its figures
    assert set(rec["preference"]) == set(bank.expert_names)
    assert all(v["samples"] == 4 and 0 <= v["degenerate"] <= 1 for v in rec["preference"].values())
    # --safety 1: the refusals of the first 3 harmful requests, each with its look-alike twin;
    # --val-safety 2: two more held out, spread over the file, whose refusals early stopping saw
    assert rec["safety_refusals"] == rec["safety_twins"] == 3
    assert rec["validation_safety"] == ["t001", "t031"]
    assert all({"refused_harmful", "refused_benign", "refused_messages"} <= set(v)
               for v in rec["early_stopping"].values())
    assert all(v["safety"] > 0 and v["safety_pair"] > 0 for v in rec["final_loss"].values())
    assert bank_main(["inspect", str(quick_bank)]) == 0
    assert "recipe   pf-train --quick" in capsys.readouterr().out


def test_quick_train_continues_from_a_bank(quick_bank, tmp_path):
    """--from: the experts and router of the bank given, then only the routed preference stage;
    the bank written names where it started and keeps that bank's figures."""
    from gguf_fixtures import _SESSION
    from pf_engine.cli.train import main
    from pf_engine.persona.bank import AdapterBank
    out = tmp_path / "more.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PF_HOME", _SESSION["home"])
        assert main(["-o", str(out), "--quick", "-q", "--from", str(quick_bank),
                     "--route-pref-steps", "2", "--route-pref-situations", "3"]) == 0
    first, bank = AdapterBank.load(quick_bank), AdapterBank.load(out)
    rec = bank.recipe
    assert rec["continued_from"]["digest"] == first.digest
    assert rec["continued_from"]["recipe"] == first.recipe["recipe"]
    assert rec["preference"] == first.recipe["preference"] and rec["joint"] == first.recipe["joint"]
    stage = rec["routed_preference"]
    assert stage["situations"] == 3 and stage["samples"] == 6 and "validation_before" in stage
    assert torch.equal(bank.router.w2, first.router.w2)
    same = all(torch.equal(bank.lora(l, m).b, first.lora(l, m).b)
               for l in first.layers() for m in first.target_modules if first.lora(l, m))
    assert same is not (stage["kept"] and stage["pairs"] > 0)


def test_quick_eval_writes_json_plot_and_readme(quick_bank, bundled_pf_home, tmp_path, capsys):
    from pf_engine.cli.eval import main
    from pf_engine.train.draws import first_draw
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- personas:start -->\nstale block\n<!-- personas:end -->\ntail\n")
    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["--adapters", str(quick_bank), "--limit", "1", "--max-new-tokens", "4",
                 "--out", str(out), "--plot", str(plot), "--readme", str(readme), "-q"]) == 0
    r = json.loads(out.read_text())
    assert set(r["families"]) == {"expert", "prompt"}
    assert set(r["families"]["expert"]["statements"]["shift"]) == set(r["poles"])
    assert 0 <= r["router"]["top2_agreement"] <= 1 and r["perplexity"]["ppl"]["base"] > 1
    u = r["usefulness"]
    assert set(u["replies"]) == {"base", "auto"} | {f"{f}:{p}" for f in ("expert", "prompt")
                                                  for p in r["poles"]}
    assert all(-1 <= v["relevance"] <= 1 for v in u["replies"].values())
    assert set(u["facts"]) == set(u["replies"]) and u["facts"]["base"]["n"] == 1
    assert 0 <= u["situations"]["moved"] <= u["situations"]["situations"]
    lead = u["situations"]["lead"]            # the leading pole's expert and system prompt too
    assert set(lead) == {"expert", "prompt"}
    assert all(0 <= v["moved"] <= u["situations"]["situations"] for v in lead.values())
    assert set(u["situation_replies"]["lead:expert"]) == {e["id"] for e in
                                                         u["situations"]["each"]}
    assert u["strength"]["all"]["n"] == 3 and len(u["side_by_side"]) >= 2
    dr = u["draws"]                          # pf-eval's default: 3 greedy draws, draw 0 as run
    assert dr["n"] == 3 and len(dr["each"]) == 3 and dr["each"][0] == first_draw(u)
    assert dr["situations"] == u["situations"]["situations"] and dr["facts"] == 1
    assert all(dr["min"][k] <= dr["mean"][k] <= dr["max"][k] for k in dr["mean"])
    assert r["sampling"]["default"]["temperature"] == 0.2
    kept = r["retention"]                    # base, auto and the experts; no prompted poles
    want = {"base", "auto"} | {f"expert:{p}" for p in r["poles"]}
    assert set(kept["reasoning"]["conditions"]) == want == set(kept["safety"]["conditions"])
    assert kept["reasoning"]["conditions"]["base"]["n_mc"] == 1
    assert set(kept["social"]["conditions"]) == {"base", "auto"}
    assert r["weights"].startswith("q4_1") and r["quantize"] is None
    assert r["provenance"]["cpu"] and r["provenance"]["commit"]    # the machine that measured
    assert plot.stat().st_size > 1000
    text = readme.read_text()
    assert "stale block" not in text and text.endswith("<!-- personas:end -->\ntail\n")
    assert "| LoRA expert |" in text and "Made by `pf-eval" in text
    assert "| auto |" in text and "side by side" in text and "Generated data:" in text
    assert "moved as well by its expert at 1.0 in " in text
    assert f"on {r['provenance']['cpu']};" in text
    assert "| multiple choice |" in text and "| goal | q4_1 (default) |" in text
    assert "Greedy draws (train/draws.py): 3 draws" in text and "(mean of 3 draws)" in text
    # the README section is a function of the JSON alone
    readme.write_text("<!-- personas:start -->\n<!-- personas:end -->\ntail\n")
    assert main(["--from-json", str(out), "--plot", str(plot), "--readme", str(readme), "-q"]) == 0
    assert readme.read_text() == text[text.index("<!-- personas:start"):]
    assert main(["--from-json", str(tmp_path / "none.json"), "--plot", "", "-q"]) == 2
    assert "cannot read pf-eval results" in capsys.readouterr().err


def test_eval_plot_goes_beside_its_json(tmp_path, monkeypatch):
    """Without --plot the heat map is plots/NAME_heatmap.png beside the JSON, so a run that
    writes elsewhere leaves the shipped plot (benchmarks/results/plots/...) alone."""
    from pf_engine.cli.eval import main
    shipped = tmp_path / "benchmarks" / "results" / "plots" / "personas_heatmap.png"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"shipped")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    mine = tmp_path / "runs" / "trial.json"
    shutil.copy(os.path.join(ROOT, "benchmarks", "results", "personas.json"), mine)
    assert main(["--from-json", str(mine), "-q"]) == 0
    assert (tmp_path / "runs" / "plots" / "trial_heatmap.png").stat().st_size > 1000
    assert shipped.read_bytes() == b"shipped"


def test_shipped_bank_resolves_by_name(bundled_pf_home, capsys):
    from pf_engine import Engine
    from pf_engine.persona.bank import SHIPPED_BANKS, AdapterBank, resolve_bank
    from pf_engine.cli.bank import main as bank_main
    from pf_engine.errors import LoadError
    assert "bigfive" in SHIPPED_BANKS
    bank = AdapterBank.load("bigfive")
    assert bank.router is not None and not bank.recipe["quick"]
    assert bank.nbytes <= 40 * 2**20
    eng = Engine.from_pretrained(adapters="bigfive", progress=False, device="cpu", dtype="fp32")
    out = eng.generate("I just lost my grandmother.", chat=True, persona="auto",
                       max_new_tokens=2)[0]
    assert out.gates["kind"] == "sequence"
    assert bank_main(["inspect", "bigfive"]) == 0
    assert "openness+" in capsys.readouterr().out
    with pytest.raises(LoadError, match="shipped bank name: bigfive"):
        resolve_bank("bigsix")


def test_train_is_reproducible(tmp_path, tiny_chat_model):
    """Same data, seed and recipe: the same bank, tensor for tensor (what the recipe promises)."""
    from safetensors.torch import load_file

    from pf_engine.train import Recipe, train_bank
    recipe = Recipe.quick()
    paths = [tmp_path / f"b{i}.safetensors" for i in range(2)]
    for p in paths:
        train_bank(DATA, p, model=tiny_chat_model[0], recipe=recipe, progress=False)
    a, b = (load_file(p) for p in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith(".b"))   # the experts trained
    recipe.seed = 1
    train_bank(DATA, tmp_path / "c.safetensors", model=tiny_chat_model[0], recipe=recipe,
               progress=False)
    c = load_file(tmp_path / "c.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
