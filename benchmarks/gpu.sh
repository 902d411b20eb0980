#!/usr/bin/env bash
# The prepared GPU run of benchmarks/pipeline.py: the RESULTS.md table, every lever of the
# throughput work, the profile and the floor, in parts that each end inside 10 minutes on
# one H100 or H200 (each part's Python run is stopped at PART_LIMIT_S, 570 s, and starts no
# part or lever after its budget; what it measured is in its JSON either way).
#
#   benchmarks/gpu.sh eager                 # stages, featurize, evaluate, sweep, train (eager);
#                                           # sdpa / channels-last / cudnn-benchmark / cpm-pairs / vae-batch levers,
#                                           # cudnn-benchmark and channels-last on the training step too;
#                                           # profiles of a CPM evaluation and of CPM training steps
#   benchmarks/gpu.sh compiled              # --compile: featurize (batch 4), evaluate (96 pairs);
#                                           # compile:reduce-overhead, channels-last and cudnn-benchmark beside them
#   benchmarks/gpu.sh compiled-train        # --compile: the training rows (micro-batch 9); compile:max-autotune
#   benchmarks/gpu.sh eager compiled        # several parts, one after the other
#
# Every compiled row compiles anew (torch.compiler.reset()), as a new process of its command
# would, and prints the time as its "incl. compilation" row (about a minute the first time
# a shape is compiled on an H200; torch's on-disk compile cache makes repeats shorter).
#
# Each part writes OUT/<part>.json (every number, rewritten after every row) and OUT/<part>.log
# (the printed tables); `python benchmarks/gpu_table.py OUT/*.json` prints the tables for
# RESULTS.md from the JSONs. OUT defaults to ./bench-out. sd4match is
# taken from this checkout's src/. On a machine without a package index, WHEELS=<folder>
# installs the wheels found there into /tmp/site first (benchmarks/gpu_wheels.sh fetches
# the two that a stock PyTorch image lacks: diffusers and transformers, at the tested versions).
# SIZE=tiny DEVICE=cpu runs the same parts on the tiny models: a check of this script, not numbers.
set -euo pipefail
[ $# -gt 0 ] || { sed -n '2,25p' "$0"; exit 2; }
part_args() {  # sets args to the pipeline.py arguments of part $1; fails for an unknown part
    case $1 in
        eager) args=(--budget-s $((limit - 150)) --profile 32 --profile-train 2
                     --levers sdpa:flash,sdpa:efficient,sdpa:cudnn,channels-last,cudnn-benchmark,cpm-pairs:4,vae-batch:8,cudnn-benchmark@train,channels-last@train) ;;
        compiled) args=(--compile --skip stages,sweep,train --featurize-batches 4 --eval-pairs 96 --budget-s $((limit - 150))
                        --levers compile:reduce-overhead,channels-last,cudnn-benchmark) ;;
        compiled-train) args=(--compile --skip stages,featurize,evaluate,sweep --train-micro 9 --budget-s $((limit - 300))
                              --levers compile:max-autotune) ;;
        *) return 1 ;;
    esac
}
limit=${PART_LIMIT_S:-570}
for part in "$@"; do
    part_args "$part" || { echo "gpu.sh: unknown part '$part' (eager, compiled, compiled-train)" >&2; exit 2; }
done
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
# a copied tree has no .git: COMMIT=<hash> names the commit measured
echo "commit ${COMMIT:-$(git -C "$here/.." log -1 --format='%h %cd' --date=short 2>/dev/null || echo 'unknown (set COMMIT)')}"

for part in "$@"; do
    part_args "$part"
    echo "== $part: python benchmarks/pipeline.py --size ${SIZE:-sd21} --device ${DEVICE:-cuda} ${args[*]}"
    set +e
    timeout "$limit" python3 "$here/pipeline.py" --size "${SIZE:-sd21}" --device "${DEVICE:-cuda}" "${args[@]}" --json "$out/$part.json" 2>&1 | tee "$out/$part.log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || echo "== $part ended with exit status $rc (124: stopped at $limit s); $out/$part.json holds what it measured"
done
