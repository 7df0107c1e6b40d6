#!/bin/bash
# One call on a lent GPU machine (issue 20): install the wheels that machine lacks, then run the named sections,
# each with the baseline in the same run. Wheels (peft, pydantic(+core, annotated_types, typing_inspection), psutil,
# pytest(+pluggy, iniconfig), pyarrow for cp312 manylinux) go in WHEELS (default .whl/ at the repository root,
# ignored by git; relative to the directory above this script, so a copy in .gpu/ needs WHEELS=../.whl: without
# it the first call of 2026-12-07 ran with no pydantic); results and logs go to $OUT (default bench/results/gpu).
#   bash bench/gpu_session.sh test train1b gen150m train7b gen1b gen7b infl1b infl1b256 infl7b
# Sections: test (the `gpu` speed-switch test), train1b/train7b (bench/train.py: the default vs 'answer-logits'; B
# rows a micro-batch, 16 by default: use B=8 for 7B on an 80 GB card), compile1b/compile7b (answer-logits vs
# + compile_layers), gen150m/gen1b/gen7b (HF generate;
# gen150m is the GPU side of `bench/generate.py --vllm-shape 150m` on a CPU), infl1b/infl1b256/infl7b
# (bench/influence.py at the default pass size and --projection-rows 256), gen1bstatic/gen7bstatic (gen1b/gen7b with
# --gpu-static-cache).
# infl1bhash/infl7bhash (the same with --projection hashed_rademacher), proj (bench/projection.py: the projection
# pass alone, rademacher vs hashed_rademacher), gputests (the `gpu` tests of test_influence.py and test_train.py),
# stage1b/stage7b (bench/generate.py --stage-gpu: the sample stage's HFGenerator, dynamic vs static cache; SP prompts
# per adapter, SB a batch), infl1bkron/infl7bkron (the dense Rademacher baseline vs influence.projection 'kronecker'
# on the same rows, with their influence ranks compared; at 1B also against a second Rademacher seed),
# infl1bkronbs/infl7bkronbs (the Kronecker projection at larger batches, which its lack of a gradient buffer allows),
# krontest (the `gpu` test of the features against the loop on CUDA, Rademacher and Kronecker; compiled layers),
# infl1bcomp/infl7bcomp (Kronecker and the dense Rademacher baseline uncompiled, then Kronecker with
# influence.compile_layers at two batch sizes, same rows; C1B= leaves the baseline out of infl1bcomp).
# T, TG, TI, TC, TP, TT, TS: per-section time limits (s); DEADLINE (seconds since the epoch, optional): no section runs past it,
# so the last sections of a call get what the first left (a device call is killed whole at its limit).
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
# The default, then the speed switch on top: the default is the baseline of every row in the same run. The
# compile sections (compile1b/compile7b: answer-logits vs + compile_layers) have their own time limit TC, since
# compiling may outlast the others (on 2026-12-07 it did not finish in what was left of train1b's 230 s).
flex=${FLEX:-"lora packed flex,lora packed flex answer-logits"}
compiled=${COMPILED:-"lora packed flex answer-logits,lora packed flex answer-logits layers-compiled"}
# 7B's KV cache at batch 256 (512 KiB/token) did not fit next to its weights on an 80 GB H100 (2026-12-07).
big=$(python3 -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory > 100e9))" 2>/dev/null)
# `timeout` with the section's limit cut to what DEADLINE leaves (at least 10 s).
timeout() {
  local t=$1; shift
  if [ -n "$DEADLINE" ]; then
    local left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt 10 ] && left=10
    [ "$left" -lt "$t" ] && t=$left
  fi
  echo "(limit ${t} s)"
  command timeout "$t" "$@"
}
for s in "$@"; do
  echo "=============== $s $(date -u +%T)"
  case "$s" in
    test) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -m gpu -k speed_switches;;
    train1b) timeout "${T:-300}" python3 bench/train.py --model builtin:random-llama-1b --rows 512 --batch-size "${B:-16}" \
      --steps 12 --warmup-steps 4 --compile --only "$flex" --out-json "$OUT/train_1b.json";;
    train7b) timeout "${T:-300}" python3 bench/train.py --model builtin:random-llama-7b --rows 512 --batch-size "${B:-16}" \
      --steps 12 --warmup-steps 4 --compile --only "$flex" --out-json "$OUT/train_7b.json";;
    compile1b | compile7b) timeout "${TC:-420}" python3 bench/train.py --model "builtin:random-llama-${s#compile}" \
      --rows 512 --batch-size "${B:-16}" --steps 12 --warmup-steps 4 --compile --only "$compiled" \
      --out-json "$OUT/train_${s#compile}_compiled.json";;
    gen150m) timeout "${TG:-120}" python3 bench/generate.py --gpu-shape 150m --gpu-batch-sizes 64 --max-new-tokens 128 \
      --out-json "$OUT/gen_150m.json";;
    gen1b | gen7b | gen1bstatic | gen7bstatic) shape=${s#gen}; shape=${shape%static}; sizes=64,128,256; static=
      [ "$shape" = 7b ] && [ "$big" != 1 ] && sizes=64,128
      [ "$s" != "gen$shape" ] && static=--gpu-static-cache
      timeout "${TG:-240}" python3 bench/generate.py --gpu-shape "$shape" --gpu-batch-sizes "$sizes" $static \
      --out-json "$OUT/gen_${shape}${static:+_static}.json";;
    stage1b | stage7b) timeout "${TS:-480}" python3 bench/generate.py --stage-gpu "${s#stage}" --prompts "${SP:-128}" \
      --batch-size "${SB:-64}" --max-new-tokens 192 --temperature 0.2 --out-json "$OUT/stage_${s#stage}.json";;
    infl1b) timeout "${TI:-240}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 0 \
      --batch-size 16 --out-json "$OUT/infl_1b.json";;
    infl1b256) timeout "${TI:-240}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 0 \
      --batch-size 16 --projection-rows 256 --out-json "$OUT/infl_1b_256.json";;
    infl1bhash) timeout "${TI:-240}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 0 \
      --batch-size 16 --projection hashed_rademacher --out-json "$OUT/infl_1b_hashed.json";;
    infl7bhash) timeout "${TI:-300}" python3 bench/influence.py --model builtin:random-llama-7b --rows 128 \
      --loop-rows 0 --batch-size 8 --projection hashed_rademacher --out-json "$OUT/infl_7b_hashed.json";;
    proj) timeout "${TP:-200}" python3 bench/projection.py --rows 96,256 --out-json "$OUT/projection_1b.json";;
    gputests) timeout "${TT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_influence.py \
      tests/test_train.py;;
    infl7b) timeout "${TI:-300}" python3 bench/influence.py --model builtin:random-llama-7b --rows 128 --loop-rows 0 \
      --batch-size 8 --out-json "$OUT/infl_7b.json";;
    infl1bkron) timeout "${TI:-300}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 \
      --loop-rows 0 --batch-size 16 --projection rademacher --projection-rows 256 --compare kronecker --seed-floor \
      --out-json "$OUT/infl_1b_kronecker.json";;
    infl1bkronbs) timeout "${TI:-300}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 \
      --loop-rows 0 --batch-size 16 32 64 --projection kronecker --out-json "$OUT/infl_1b_kronecker_batches.json";;
    infl7bkron) timeout "${TI:-420}" python3 bench/influence.py --model builtin:random-llama-7b --rows 128 \
      --loop-rows 0 --batch-size 8 --projection rademacher --compare kronecker --out-json "$OUT/infl_7b_kronecker.json";;
    infl7bkronbs) timeout "${TI:-300}" python3 bench/influence.py --model builtin:random-llama-7b --rows 128 \
      --loop-rows 0 --batch-size 8 16 32 --projection kronecker --out-json "$OUT/infl_7b_kronecker_batches.json";;
    infl1bcomp) timeout "${TI:-420}" python3 bench/influence.py --model builtin:random-llama-1b --rows 256 \
      --loop-rows 0 --batch-size 16 32 --projection kronecker --compare ${C1B-rademacher} --projection-rows 256 \
      --compile-layers both --out-json "$OUT/infl_1b_compiled.json";;
    infl7bcomp) timeout "${TI:-480}" python3 bench/influence.py --model builtin:random-llama-7b --rows 128 \
      --loop-rows 0 --batch-size 8 16 --projection kronecker --compare rademacher --compile-layers both \
      --out-json "$OUT/infl_7b_compiled.json";;
    krontest) timeout "${TT:-200}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_influence.py \
      -k dense_loop_reference;;
    *) echo "unknown section $s";;
  esac
done
