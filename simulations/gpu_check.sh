#!/usr/bin/env bash
# The GPU proof in one call: the training-step bench on CUDA, a short central DP training (bf16 autocast on
# CUDA), and a 3-round federation whose merchants train on the GPU.
#
#   simulations/gpu_check.sh prepare   here, with PyPI reachable: wheels for what the GPU machine lacks
#                                      (Python 3.12, x86-64), an fp16 copy of the bundled MiniLM and
#                                      MovieLens-100k, into .gpu/ (git-ignored, under the 64 MiB that travels)
#   simulations/gpu_check.sh run       on the GPU machine, in the repository root, with .gpu carried: installs
#                                      .gpu/wheels into /tmp/site (no network, nothing else), then the checks
#   simulations/gpu_check.sh dry-run   here, on the CPU: the same checks at their smallest, with this
#                                      environment's packages (GPU_CHECK_DATA and GPU_CHECK_MODEL override
#                                      the data and the encoder)
#
# The federation is a real deployment on 127.0.0.1 (`silorec-sim localhost`: a SuperLink and three SuperNodes,
# all on the one GPU) rather than Flower's simulation engine: Ray's wheel alone is over 64 MiB, so it cannot
# travel. Outputs go to $OUT when it is set (the device tool's), else to a fresh temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_DIR=.gpu
PY_VERSION=3.12
# What the GPU image lacks of silorec's needs, at the versions this project tests (`pip list` here), and what
# they need in turn; the image's own torch, transformers, peft, numpy, pandas and scipy are used as they are.
WHEELS=(
    opacus==1.6.0 flwr==1.42.0 cryptography==50.0.2 cffi==2.0.0 pycparser==2.23 pycryptodome==3.24.1
    iterators==0.0.2 grpcio-health-checking==1.81.1 tomli==2.5.0 tomli-w==1.2.0 prompt-toolkit==3.0.53
    wcwidth==0.2.14 sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3 typer==0.20.1 packaging==25.0
    fastapi==0.138.2 starlette==1.3.1 uvicorn==0.49.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.2
)
LIMIT=$((64 * 1024 * 1024))

prepare() {
    local py=".venv/bin/python"
    [ -x "$py" ] || { echo "gpu_check: run 'make install' first (prepare uses .venv)" >&2; exit 1; }
    rm -rf "$GPU_DIR.tmp" && mkdir -p "$GPU_DIR.tmp/wheels"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$GPU_DIR.tmp/wheels" "${WHEELS[@]}"
    "$py" - "$GPU_DIR.tmp/model" <<'EOF'
import sys

import torch
from transformers import AutoModel, AutoTokenizer

from common.model_config import ModelConfig
from common.encoder import resolve_base_model

path = resolve_base_model(ModelConfig().base_model)  # the bundled MiniLM, from its package
model = AutoModel.from_pretrained(path, dtype=torch.float16)  # loads back as fp32 or bf16
model.save_pretrained(sys.argv[1], safe_serialization=True)
AutoTokenizer.from_pretrained(path).save_pretrained(sys.argv[1])
EOF
    [ -f data/ml-100k/interactions.csv ] || .venv/bin/silorec-sim fetch-data movielens-100k --out data/ml-100k
    tar -czf "$GPU_DIR.tmp/ml-100k.tar.gz" -C data ml-100k
    local size tree
    size=$(du -sb "$GPU_DIR.tmp" | cut -f1)
    tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
    if [ $((size + tree)) -gt $((LIMIT - 512 * 1024)) ]; then
        echo "gpu_check: $GPU_DIR ($size bytes) and the tree ($tree) would not travel: over 64 MiB" >&2
        exit 1
    fi
    rm -rf "$GPU_DIR" && mv "$GPU_DIR.tmp" "$GPU_DIR"
    echo "prepared $GPU_DIR ($((size / 1024 / 1024)) MiB, $(((size + tree) / 1024 / 1024)) MiB with the tree): carry it, e.g. run(command='simulations/gpu_check.sh run', carry=['$GPU_DIR'])"
}

checks() {  # DEVICE PY DATA MODEL WORK SIZES STEPS EPOCHS ROUNDS
    local device=$1 py=$2 data=$3 model=$4 work=$5 sizes=$6 steps=$7 epochs=$8 rounds=$9
    export PYTHONUNBUFFERED=1
    echo "== 1/3 the training step on $device: users/s and peak memory, non-DP, DP, ghost clipping"
    "$py" -m simulations.cli bench --data "$data" --base-model "$model" --device "$device" --batch-sizes "$sizes" \
        --steps "$steps" --out "$work/bench.json" --cache "$work/cache"
    echo "== 2/3 central DP-SGD on $device (ε=8, $epochs epoch(s)$([ "$device" = cuda ] && echo ', bf16 autocast'))"
    "$py" -m simulations.cli central --data "$data" --out "$work/central" --epsilon 8 --epochs "$epochs" \
        --base-model "$model"
    "$py" - "$work/central/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"central: device {m.get('device')}, test NDCG@10 {m['test']['ndcg@10']:.4f}, ε {m.get('epsilon')}, "
      f"{m.get('wall_seconds', m.get('seconds', float('nan'))):.0f} s")
EOF
    echo "== 3/3 a $rounds-round federation of 3 merchants on 127.0.0.1, their training on $device"
    "$py" -m simulations.cli localhost --data "$data" --out "$work/federation" --merchants 3 --timeout 420 -- \
        "num-server-rounds=$rounds" "eval-every=$rounds" "base-model=$model" "epsilon=8"
    "$py" - "$work/federation/run/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"federation: {m['rounds']} rounds, {len(m['merchants'])} merchants, test NDCG@10 {m['test']['ndcg@10']:.4f}")
EOF
}

case "${1:-}" in
    prepare)
        prepare
        ;;
    run)
        [ -d "$GPU_DIR/wheels" ] || { echo "gpu_check: no $GPU_DIR/wheels: run 'simulations/gpu_check.sh prepare' here first and carry $GPU_DIR" >&2; exit 1; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_DIR"/wheels/*.whl
        export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
        python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
        work="${OUT:-$(mktemp -d)}/gpu-check"
        mkdir -p "$work" /tmp/gpu-data && tar -xzf "$GPU_DIR/ml-100k.tar.gz" -C /tmp/gpu-data
        nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
        checks cuda python3 /tmp/gpu-data/ml-100k "$PWD/$GPU_DIR/model" "$work" 64,256,1024 5 2 3
        nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
        ;;
    dry-run)
        py="${GPU_CHECK_PYTHON:-.venv/bin/python}"
        work="${OUT:-$(mktemp -d)}/gpu-check"
        mkdir -p "$work"
        checks cpu "$py" "${GPU_CHECK_DATA:-data/ml-100k}" "${GPU_CHECK_MODEL:-bundled}" "$work" 8 1 1 3
        ;;
    *)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
