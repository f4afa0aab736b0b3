#!/bin/bash
# Issues 19 and 20's GPU measurements on one GPU, as device commands of at most 10 minutes each:
#
#   bash bench/device_session.sh eval    # GPU tests of the new kernels, the decode attention sweep, bench_eval
#   bash bench/device_session.sh train   # bench_train's issue-19 setups, then profile_train
#   bash bench/device_session.sh grpo    # the rollout engine's GPU tests, then bench_grpo (hf and fast rollouts)
#   bash bench/device_session.sh compiled  # bench_train's compiled-layer setups (training.compile_layers)
#   GSM8K_DIR=... bash bench/device_session.sh cli  # the real CLI (study_gpu.py, NF4) on the real GSM8K rows
#
# Run from the repository root on the device machine, with the training wheels carried in .whl/ (see
# bench/README.md, "Next device session"). Everything goes to $OUT: one log per step and each script's JSON.
# Each step has its own time limit, so a slow step cannot take the later ones' results with it.
set -u
phase=${1:?usage: bench/device_session.sh eval|train|compiled|grpo|cli}
out=${OUT:?set OUT to the folder the results go to}
started=$SECONDS
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
nvidia-smi -L
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $out/NAME.log, at most LIMIT_S seconds, and at
# most what is left of the phase's 560 s; prints the log's last lines.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((560 - (SECONDS - started)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped, no time left"; return; fi
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name exit $? after $((SECONDS - started))s"
  grep -v -i -E "warn|Loading weights|it/s\]|s/it\]|examples/s\]" "$out/$name.log" | tail -${TAIL:-12}
}

case $phase in
  eval)
    # The kernels on the GPU first: rounding, launch configurations, column-block reads, fused projections.
    step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_fast_generate.py \
      -k "fused or launch_configs or split_decode or column_blocks or cuda or merged_lora or prefill or stale or writes_this_step or min_new or start_up_check or hopper"
    # The eval decodes one batch of 1,319 rows a model since 2026-12-02: the sweep and the profile at that shape.
    step tune_decode_attention 120 python3 -m bench.tune_decode_attention --rows 1319 --budget-s 80 \
      --out "$out/tune_decode_attention.json"
    best=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r.get('best_spec',''))" \
      "$out/tune_decode_attention.json" 2>/dev/null)
    default=$(python3 -c "from training.fused_kernels import DecodeAttentionConfig as C; print(C().spec())")
    attention=()
    [ -n "$best" ] && [ "$best" != "$default" ] && attention=(--decode-attention "$best")
    echo "== decode attention for bench_eval: ${best:-none found} ${attention[*]}"
    # The HF baselines were measured on 2026-12-01 and are not goals: skipped, to leave time for the rest. The
    # GPU's clocks and power every 2 s beside it: at 1,319 rows the GEMMs hold the GPU at its power limit.
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -l 2 > "$out/clocks.csv" 2>&1 &
    clocks=$!
    TAIL=30 step bench_eval 200 python3 -m bench.bench_eval --skip-baselines --fuse-projections "${attention[@]}" \
      --out "$out/bench_eval.json"
    kill $clocks
    # Triton paths only (the eager ones are a minute at this shape), one prefill chunk size; the JSON is written
    # after every stage, so the step's time limit keeps what finished.
    step profile_decode 200 python3 -m bench.profile_decode --rows 1319 --prefill-rows 1319 --prefill-chunks 16384 \
      --skip-eager --fuse-projections "${attention[@]}" --out "$out/profile_decode.json"
    ;;
  train)
    # References (no Liger) run first inside bench_train, then the candidates in this order (most likely
    # to meet the goals first: if the time limit stops the run, the JSON holds every setup finished).
    TAIL=25 step bench_train 420 python3 -m bench.bench_train --rows-per-setup 384 --setups \
      ours_nf4,ours_bf16,ours_b24_nf4,ours_liger_nf4,ours_liger_pf_flex_nf4,ours_liger_pf_flex_b24_nf4,ours_liger_pf_flex_bf16,ours_liger_pf_nf4 \
      --out "$out/bench_train.json"
    TAIL=25 step profile_train 130 python3 -m bench.profile_train --setups ours_nf4,ours_bf16 --warmup 3 --steps 3 \
      --out "$out/profile_train.json"
    ;;
  compiled)
    # Compiled decoder layers (2026-12-02's open questions): padded batches at multiples of 8 without a recompile
    # in the steady window, bf16's loss check with eager's rounding, and padding-free + flex + compiled in bf16.
    TAIL=25 step bench_train 540 python3 -m bench.bench_train --rows-per-setup 384 --setups \
      ours_nf4,ours_bf16,ours_pf_flex_layers_nf4,ours_pf_flex_layers_bf16,ours_layers_bf16,ours_layers_nf4 \
      --out "$out/bench_train_layers.json"
    ;;
  grpo)
    # Sampling under CUDA graphs and the NF4 copy have only run on a CPU: their GPU tests first.
    step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rollouts.py \
      tests/test_fast_generate.py::test_sampling_under_cuda_graphs_draws_what_eager_draws_fp32
    TAIL=30 step bench_grpo 400 python3 -m bench.bench_grpo --rollouts hf,fast --steps 4 --out "$out/grpo_gpu.json"
    ;;
  cli)
    # train-and-publish, publish, regenerate-cards and push-eval as a user runs them, NF4, on GSM8K rows carried
    # beside the repository (GSM8K_DIR: a copy of ../shared/data/gsm8k, or of only the rows used).
    data=${GSM8K_DIR:?set GSM8K_DIR to the GSM8K folder carried with the repository}
    TAIL=25 step study_gpu 500 python3 -m bench.study_gpu --data-dir "$data" --runs nf4 --training-seeds 42 \
      --train-rows 64 --problems 64 --max-new-tokens 128 --work /tmp/study_gpu_work --out "$out/study_gpu.json"
    ;;
  *)
    echo "unknown phase $phase: use eval, train, compiled, grpo or cli"
    exit 2
    ;;
esac
nvidia-smi --query-gpu=memory.used --format=csv
echo "phase $phase done in $((SECONDS - started))s"
