"""lm-evaluation-harness against pf-serve, unchanged: ``local-completions`` (token-id prompts,
several per request, echo + logprobs 1 + max_tokens 1 for log-likelihoods; stop strings for
generation; the tokenizer through /tokenize, /detokenize and /tokenizer_info) gives what
``--model hf`` gives on the same folder: equal accuracy, per-choice log-likelihoods within 1e-3,
the same generations.

Two small tasks written for the tests (tests/data/lm_eval: ten multiple-choice questions, five
short-answer ones), read from local JSONL files; no hub.  Marked slow (the bundled
SmolLM2-135M under transformers and under the engine, about a minute); it runs in .ci/run.
"""
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

from pf_engine import Engine  # noqa: E402
from pf_engine.serve import build_app  # noqa: E402
from pf_engine.serve.threaded import ThreadedServer  # noqa: E402

pytestmark = pytest.mark.slow
DATA = os.path.join(os.path.dirname(__file__), "data", "lm_eval")
MID = "smollm2"

MC = """task: pf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""

GEN = """task: pf_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "pf_mc.yaml").write_text(MC.format(path=os.path.join(DATA, "mc.jsonl")))
    (d / "pf_gen.yaml").write_text(GEN.format(path=os.path.join(DATA, "gen.jsonl")))
    return str(d)


def run(model: str, model_args: str, tasks: str) -> dict:
    from lm_eval.tasks import TaskManager
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return lm_eval.simple_evaluate(model=model, model_args=model_args,
                                   tasks=["pf_mc", "pf_gen"], batch_size=4, log_samples=True,
                                   task_manager=TaskManager(include_path=tasks),
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def by_doc(result: dict, task: str) -> dict:
    return {s["doc_id"]: s for s in result["samples"][task]}


def test_local_completions_against_pf_serve_equals_hf(converted_smollm2, tasks):
    ref = run("hf", f"pretrained={converted_smollm2},dtype=float32,device=cpu", tasks)
    eng = Engine.from_pretrained(converted_smollm2, progress=False, device="cpu", dtype="fp32")
    eng.new_scheduler(slots=4, max_len=512)
    with ThreadedServer(build_app(eng, MID, timeout_s=300)) as server:
        got = run("local-completions",
                  f"model={MID},base_url={server.url}/v1/completions,num_concurrent=1,"
                  "max_retries=1,tokenized_requests=True,tokenizer_backend=remote", tasks)
    for key in ("acc,none",):
        assert got["results"]["pf_mc"][key] == ref["results"]["pf_mc"][key]
    assert got["results"]["pf_gen"]["exact_match,none"] == \
        ref["results"]["pf_gen"]["exact_match,none"]
    a, b = by_doc(ref, "pf_mc"), by_doc(got, "pf_mc")
    assert set(a) == set(b) and len(a) == 10
    for i in a:
        lls_ref = [r[0][0] for r in a[i]["resps"]]
        lls_got = [r[0][0] for r in b[i]["resps"]]
        assert lls_got == pytest.approx(lls_ref, abs=1e-3), i
        assert [r[0][1] for r in a[i]["resps"]] == [r[0][1] for r in b[i]["resps"]]   # greedy
    a, b = by_doc(ref, "pf_gen"), by_doc(got, "pf_gen")
    assert [a[i]["filtered_resps"] for i in sorted(a)] == [b[i]["filtered_resps"] for i in sorted(b)]
    assert any(r[0].strip() for i in a for r in [a[i]["filtered_resps"]])   # it said something
