#!/bin/bash
# One call on a lent GPU machine (issue 20): install the wheels that machine lacks, then run the named sections,
# each with the baseline in the same run. Wheels (peft, pydantic(+core, annotated_types, typing_inspection), psutil,
# pytest(+pluggy, iniconfig), pyarrow for cp312 manylinux) go in WHEELS (default .whl/ at the repository root,
# ignored by git); results and logs go to $OUT (default bench/results/gpu).
#   bash bench/gpu_session.sh test train1b gen150m train7b gen1b gen7b infl1b infl1b256 infl7b
# Sections: test (the `gpu` speed-switch test), train1b/train7b (bench/train.py: 'cast' = peft's input casts, the
# behaviour before train.lora_cast_inputs, vs the default vs 'answer-logits'), gen150m/gen1b/gen7b (HF generate;
# gen150m is the GPU side of `bench/generate.py --vllm-shape 150m` on a CPU), infl1b/infl1b256/infl7b
# (bench/influence.py at the default pass size and --projection-rows 256). T, TG, TI: per-section time limits (s).
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-bench/results/gpu}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" /tmp/site
for w in "$WHEELS"/*.whl; do
  [ -f "$w" ] || continue
  m=$(basename "$w" | cut -d- -f1 | tr A-Z a-z)
  python3 -c "import $m" 2>/dev/null && continue  # the machine's own copy wins
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" 2>&1 | tail -1
done
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The default, then each speed switch on top: the default is the baseline of every row in the same run.
flex=${FLEX:-"lora packed flex,lora packed flex answer-logits,lora packed flex answer-logits layers-compiled"}
for s in "$@"; do
  echo "=============== $s $(date -u +%T)"
  case "$s" in
    test) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -m gpu -k speed_switches;;
    train1b) timeout "${T:-300}" python3 bench/train.py --model builtin:random-llama-1b --rows 512 --batch-size "${B:-16}" \
      --steps 12 --warmup-steps 4 --compile --only "$flex" --out-json "$OUT/train_1b.json";;
    train7b) timeout "${T:-300}" python3 bench/train.py --model builtin:random-llama-7b --rows 512 --batch-size "${B:-16}" \
      --steps 12 --warmup-steps 4 --compile --only "$flex" --out-json "$OUT/train_7b.json";;
    gen150m) timeout "${TG:-120}" python3 bench/generate.py --gpu-shape 150m --gpu-batch-sizes 64 --max-new-tokens 128 \
      --out-json "$OUT/gen_150m.json";;
    gen1b | gen7b) timeout "${TG:-240}" python3 bench/generate.py --gpu-shape "${s#gen}" --gpu-batch-sizes 64,128,256 \
      --out-json "$OUT/gen_${s#gen}.json";;
    infl1b) timeout "${TI:-240}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 0 \
      --batch-size 16 --out-json "$OUT/infl_1b.json";;
    infl1b256) timeout "${TI:-240}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 0 \
      --batch-size 16 --projection-rows 256 --out-json "$OUT/infl_1b_256.json";;
    infl7b) timeout "${TI:-300}" python3 bench/influence.py --model builtin:random-llama-7b --rows 128 --loop-rows 0 \
      --batch-size 8 --out-json "$OUT/infl_7b.json";;
    *) echo "unknown section $s";;
  esac
done
