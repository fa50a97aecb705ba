#!/usr/bin/env bash
# The checks and benchmarks of one lent-GPU session, in one call (BENCHMARKS.md, "On a GPU").
#
#   bash benchmarks/gpu_session.sh [STEP ...]   # logs under $OUT (default: gpu-out/)
#
# Steps (all by default): test_cuda test_train forward mixed mixed_decode train saved profile.
# Runs with the machine's own python3 and packages (torch, transformers, peft); wheels in .whl/
# (bitsandbytes) are installed to /tmp/site first. Each step has its own time limit, so one that
# hangs costs only its own slot.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="src:tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
STEPS=" ${*:-test_cuda test_train forward mixed mixed_decode train saved profile} "
step() {  # step NAME SECONDS COMMAND...: if NAME was asked for, run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
}
nvidia-smi -L
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || true

step test_cuda 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_cuda_shard.py
step test_train 150 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_train.py

LLAMA_1B=(--device cuda --dtype bfloat16 --hidden 2048 --layers 16 --intermediate 5632 --heads 32)
step forward 120 python3 benchmarks/forward_latency.py "${LLAMA_1B[@]}" --batch 16 --seq 512 --rounds 20 --warmup 3
step mixed 150 python3 benchmarks/mixed_batch.py --device cuda --adapters 16,64 --rounds 30,20
step mixed_decode 120 python3 benchmarks/mixed_batch.py --device cuda --seq 1 --adapters 16,64 --rounds 50,50
step train 300 python3 benchmarks/train_step.py "${LLAMA_1B[@]}" --batch 8 --seq 512 --rounds 10 --qlora-rounds 5 \
    --variants base,lora,dora,vera,lora-fa,qlora
step saved 120 python3 benchmarks/saved_activations.py "${LLAMA_1B[@]}" --batch 8 --seq 512 --project-layers 0 --top 4
step profile 120 python3 benchmarks/profile_step.py "${LLAMA_1B[@]}" --batch 8 --seq 512 --methods lora,vera --steps 2
for f in test_cuda test_train; do [[ -f $OUT/$f.log ]] && tail -2 "$OUT/$f.log"; done
grep -h "^#### " "$OUT/profile.log" 2>/dev/null
for f in forward mixed mixed_decode train saved; do
    [[ -f $OUT/$f.log ]] && grep -E '^(\||- |#)' "$OUT/$f.log" | grep -v "^- command"
done
true
