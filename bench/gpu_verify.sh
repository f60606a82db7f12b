#!/usr/bin/env bash
# Every single-GPU claim, measured on the lent GPU (issue 19), in three calls of under ten minutes,
# most important first. Run from the repository root of a plain checkout with $OUT set:
#   bash bench/gpu_verify.sh 1     # engine overhead vs the bare loop, its diagnosis, export check
#   bash bench/gpu_verify.sh 2     # batching strategies on the built-in corpus
#   bash bench/gpu_verify.sh 3     # the estimator matrix (11 architectures x 6), context, new capabilities
#   bash bench/gpu_verify.sh 4     # A/B of the engine's per-step bookkeeping (host-bound steps), export again
#   bash bench/gpu_verify.sh 5     # after the fix (quiet repeated shapes, GC freeze): 1's checks again
#   bash bench/gpu_verify.sh 6     # LoRA / QLoRA / 8-bit AdamW vs full, generation, calibrate
#   bash bench/gpu_verify.sh 7     # what 6 left out: Llama/sliding-window generation, Llama LoRA, calibrate
#   bash bench/gpu_verify.sh 8     # still left (2026-12-02): speed rows alone (then refit here with
#                                  #   bench/fit_speed.py --extra $OUT/speed), calibrate after its fix,
#                                  #   a longer interleaved overhead A/B
#   bash bench/gpu_verify.sh 9     # the matrix rows not reached, generation at P = 4096
#   bash bench/gpu_verify.sh 10    # (2026-12-02, third) 8 and 9 as they should have been: the 30
#                                  #   matrix rows call 8 did not reach (9's --only named the wrong
#                                  #   models) with the bert masked-LM rows, calibrate, speed rows alone
#   bash bench/gpu_verify.sh 12    # memory snapshots of the two holes 10 found again: bert masked-LM
#                                  #   under bf16 autocast, Gemma-3-like reserved (bench/diag_snapshot.py)
#   bash bench/gpu_verify.sh 14    # the allocator traces of the rows whose reserved the estimate misses
#                                  #   most (gemma-3-like bf16-amp, Llama fp32 inference, Qwen bf16-amp)
#   bash bench/gpu_verify.sh 15    # not run (no machine at the time): does autograd sum a tied weight's
#                                  #   gradients in place on CUDA (diag_grad_accumulate.py), and the
#                                  #   Gemma-3-like rows left out of generation at P = 4096
#   bash bench/gpu_verify.sh 16    # (2026-12-02, fourth) held-out estimator rows, one process at a
#                                  #   time (clean reserved, device-used and tokens/s): shapes and
#                                  #   optimizers nothing was tuned on, 12 architectures x 6
#   bash bench/gpu_verify.sh 17    # the held-out rows 16 did not reach, 16's long-text traces
#   bash bench/gpu_verify.sh 18    # 15's runs (the gradient-sum check ran in call 16: out of place on CUDA as
#                                  #   on CPU; Gemma-3-like generation at P = 4096 not yet run)
#   bash bench/gpu_verify.sh 19    # (2026-12-02, fifth) the checkpointed bert masked-LM trace (no stacks:
#                                  #   torch's stack capture fails in a checkpointed backward), the second
#                                  #   held-out set (HELDOUT2_DONE: outputs to skip), Gemma-3-like P = 4096
#   bash bench/gpu_verify.sh 11    # generation at P = 4096, the interleaved overhead A/B, and the
#                                  #   matrix rows still left (MATRIX_DONE: more outputs to skip)
# Each part writes JSON lines and logs to $OUT and skips what its code does not have yet.
set -u
part="${1:?usage: bash bench/gpu_verify.sh 1|2|...|19}"
: "${OUT:?set OUT to an output folder}"
export PYTHONPATH=. TOKENIZERS_PARALLELISM=false
PY=python3
# More than 8 files come back from the device only packed: pack NAME tars what $OUT holds into NAME.tgz
pack() { (cd "$OUT" && files=$(ls | grep -v '\.tgz$') && tar czf "$1.tgz" $files && rm -rf $files); }
# traces "NAME|measure args" ...: 3 measured steps with the allocator's history, then its trace
# (bench/diag_snapshot.py --events-out) and peaks; the long-text dataset is /tmp/long.jsonl.
# NO_STACKS=1: record without Python stacks (context=None); with checkpointing, stack capture
# makes run_backward fail with "SystemError: returned NULL without setting an exception".
NO_STACKS_MEASURE='import runpy, sys, torch
record = torch.cuda.memory._record_memory_history
def no_stacks(enabled="all", **kw):
    return record(enabled, **kw) if enabled is None else record(enabled, context=None, **kw)
torch.cuda.memory._record_memory_history = no_stacks
sys.argv = ["headroom"] + sys.argv[1:]
runpy.run_module("engine", run_name="__main__")'
traces() {
  (cd bench && $PY -c 'from gpu_measure_matrix import long_texts; from pathlib import Path; long_texts(Path("/tmp/long.jsonl"))')
  for spec in "$@"; do
    name=${spec%%|*}
    if [ -n "${NO_STACKS:-}" ]; then run=(-c "$NO_STACKS_MEASURE"); else run=(-m engine); fi
    timeout 90 $PY "${run[@]}" measure ${spec#*|} --steps 3 --target cuda --padding fixed \
      --json --snapshot "/tmp/$name.pickle" 2>/dev/null | tail -1 > "$OUT/$name.json"
    echo "$name: $(timeout 60 $PY bench/diag_snapshot.py "/tmp/$name.pickle" --compact --top 6 \
      --events-out "$OUT/${name}_events.json.gz")" >> "$OUT/peaks.log"
  done
}
LONG_TRACES=(
  "qwen_lora_fp32|--model Qwen2.5-0.5B --precision fp32 --lora 16 --batch 4 --seq 512 --dataset /tmp/long.jsonl"
  "llama_sgd_fp32|--model Llama-3.2-1B --precision fp32 --optimizer sgd --batch 4 --seq 512 --dataset /tmp/long.jsonl"
  "qwen3_infer_bf16|--model bench/configs/qwen3-0_6b-like --mode infer --precision bf16-amp --batch 16 --seq 512 --dataset /tmp/long.jsonl"
)
# heldout_rows SETTINGS NAME BUDGET_S [DONE.jsonl ...]: gpu_estimator_matrix.py's held-out rows one
# process at a time into $OUT/NAME.jsonl, skipping those DONE files ran
heldout_rows() {
  local settings=$1 name=$2 budget=$3; shift 3
  timeout $((budget + 70)) $PY bench/gpu_estimator_matrix.py --settings "$settings" -j 1 --steps 4 \
    --budget-s "$budget" --timeout-s 60 --skip-done "$@" --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1
  tail -3 "$OUT/$name.log"
}
# gemma_generate BUDGET_S: Gemma-3-like generation at P = 4096 (bench/gpu_generate.py)
gemma_generate() {
  timeout $(($1 + 40)) $PY bench/gpu_generate.py --out "$OUT/generate" --budget-s "$1" --gpu h200 \
    --prompts 4096 --models gemma-3-270m-like > "$OUT/generate.log" 2>&1
  tail -6 "$OUT/generate.log"
}
has_flag() { $PY -m engine "$1" --help 2>/dev/null | grep -q -- "$2"; }

gpu_facts() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  $PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)' >> "$OUT/gpu.txt" 2>&1
}

case "$part" in
1)
  gpu_facts
  # 1. Engine overhead: headroom measure vs the independent bare loop, 24 steps (>= 20 timed).
  timeout 250 $PY bench/gpu_measure_matrix.py --quick --modes train --steps 24 --budget-s 230 \
    --timeout-s 70 --out "$OUT/cross.jsonl" > "$OUT/cross.log" 2>&1
  # ... and where it differs: engine loop vs the same data vs random data (with a profiler table).
  timeout 110 $PY bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp \
    --steps 24 --profile > "$OUT/diag_bert.log" 2>&1
  timeout 110 $PY bench/diag_step_overhead.py --model Qwen2.5-0.5B --precision bf16-amp \
    --checkpointing --steps 16 > "$OUT/diag_qwen.log" 2>&1
  # 3. Export: the exported script vs headroom measure, 24 steps.
  timeout 170 $PY bench/gpu_export_check.py --steps 24 --out "$OUT/export_check.jsonl" \
    > "$OUT/export_check.log" 2>&1
  tail -8 "$OUT/cross.log"; grep -h "cost" "$OUT"/diag_*.log; tail -6 "$OUT/export_check.log"
  ;;
2)
  gpu_facts
  # 2. Batching: the best strategies and fixed for both models, then the rest; two passes each.
  $PY bench/gpu_batching.py --out "$OUT/batching64.jsonl" --budget-s 300 --no-chunked --pad-multiple 64 \
    --only gpt2/fixed,gpt2/token-budget+pad64,Qwen2.5-0.5B/fixed,Qwen2.5-0.5B/token-budget+pad64,Qwen2.5-0.5B/bucketed+pad64,gpt2/bucketed+pad64,Qwen2.5-0.5B/token-budget \
    > "$OUT/batching64.log" 2>&1
  for m in 32 16; do
    $PY bench/gpu_batching.py --out "$OUT/batching$m.jsonl" --budget-s 100 --no-chunked --pad-multiple $m \
      --only gpt2/token-budget+pad$m,Qwen2.5-0.5B/token-budget+pad$m > "$OUT/batching$m.log" 2>&1
  done
  $PY bench/gpu_batching.py --out "$OUT/batching_rest.jsonl" --budget-s 60 --min-run-s 20 --no-chunked \
    --only Qwen2.5-0.5B/dynamic,Qwen2.5-0.5B/bucketed > "$OUT/batching_rest.log" 2>&1
  grep -h "^\[" "$OUT"/batching*.log
  ;;
3)
  gpu_facts
  # 4. The estimator matrix: 66 rows, 4 at a time (peaks are per process).
  timeout 400 $PY bench/gpu_estimator_matrix.py --out "$OUT/estimator_matrix.jsonl" -j 4 --steps 4 \
    --budget-s 330 --timeout-s 120 > "$OUT/estimator_matrix.log" 2>&1
  # Context calibration: solo runs (device used - reserved = the CUDA context), one per mode/precision.
  for args in "--model gpt2 --precision fp32" "--model gpt2 --precision bf16-amp" \
              "--model gpt2 --mode infer --precision bf16-amp" "--model Qwen2.5-0.5B --precision bf16"; do
    timeout 60 $PY -m engine measure $args --batch 4 --seq 256 --steps 3 --target cuda --json 2>/dev/null \
      | tail -1 >> "$OUT/context.jsonl"
  done
  # 5. Capabilities, as their code lands: LoRA, 8-bit optimizers, generation.
  if has_flag measure --lora; then
    timeout 60 $PY -m engine measure --model Qwen2.5-0.5B --lora 16 --precision bf16-amp --batch 8 --seq 512 \
      --steps 6 --target cuda --json 2>>"$OUT/capabilities.log" | tail -1 >> "$OUT/capabilities.jsonl"
  fi
  if has_flag measure --new-tokens; then
    timeout 60 $PY -m engine measure --model Qwen2.5-0.5B --mode generate --batch 8 --prompt-len 512 \
      --new-tokens 64 --target cuda --json 2>>"$OUT/capabilities.log" | tail -1 >> "$OUT/capabilities.jsonl"
  fi
  tail -3 "$OUT/estimator_matrix.log"; wc -l "$OUT/context.jsonl"
  ;;
4)
  gpu_facts
  # 1, continued: which part of the engine's bookkeeping costs time in host-bound steps (A/B, pinned
  # to one core, interleaved twice), and a GPU-bound shape of the same model.
  V=engine,engine-nohooks,engine-noprobe,bare-loop
  timeout 170 $PY bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp --steps 24 \
    --variants $V --repeat 2 --pin 2 > "$OUT/ab_bert.log" 2>&1
  timeout 80 $PY bench/diag_step_overhead.py --model Qwen2.5-0.5B --precision bf16-amp --checkpointing \
    --steps 16 --variants engine,engine-noprobe,bare-loop --pin 2 > "$OUT/ab_qwen.log" 2>&1
  timeout 60 $PY bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp --batch 32 \
    --steps 16 --variants engine,bare-loop --pin 2 > "$OUT/ab_bert32.log" 2>&1
  timeout 60 $PY bench/gpu_export_check.py --models Qwen2.5-0.5B --steps 24 --out "$OUT/export_check2.jsonl" \
    > "$OUT/export_check2.log" 2>&1
  grep -h '^{"variant"' "$OUT"/ab_*.log; tail -3 "$OUT/export_check2.log"
  ;;
5)
  gpu_facts
  # 1 again with the overhead fix: engine vs bare (24 steps), the A/B new vs old bookkeeping
  # (pinned, interleaved), the GPU-bound control, and the export check.
  timeout 250 $PY bench/gpu_measure_matrix.py --quick --modes train --steps 24 --budget-s 230 \
    --timeout-s 70 --out "$OUT/cross.jsonl" > "$OUT/cross.log" 2>&1
  timeout 150 $PY bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp --steps 24 \
    --variants engine,engine-instrumented,bare-loop --repeat 2 --pin 2 > "$OUT/ab_bert.log" 2>&1
  timeout 80 $PY bench/diag_step_overhead.py --model Qwen2.5-0.5B --precision bf16-amp --checkpointing \
    --steps 16 --variants engine,engine-instrumented,bare-loop --pin 2 > "$OUT/ab_qwen.log" 2>&1
  timeout 70 $PY bench/gpu_export_check.py --models Qwen2.5-0.5B --steps 24 --out "$OUT/export_check.jsonl" \
    > "$OUT/export_check.log" 2>&1
  tail -8 "$OUT/cross.log"; grep -h '^{"variant"' "$OUT"/ab_*.log; tail -3 "$OUT/export_check.log"
  ;;
6)
  gpu_facts
  # 5. Capabilities. bitsandbytes is not installed on the device: its wheel travels in .whl/.
  WHEEL=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -1)
  timeout 290 $PY bench/gpu_lora.py --out "$OUT/lora" ${WHEEL:+--wheel "$WHEEL"} > "$OUT/lora.log" 2>&1
  timeout 220 $PY bench/gpu_generate.py --out "$OUT/generate" --budget-s 140 --gpu h200 \
    > "$OUT/generate.log" 2>&1
  timeout 50 $PY -m engine calibrate --json --output "$OUT/calibrate_h200.json" > "$OUT/calibrate.log" 2>&1
  tail -20 "$OUT/lora.log"; tail -12 "$OUT/generate.log"; tail -c 600 "$OUT/calibrate.log"
  ;;
7)
  gpu_facts
  # 5, continued: what 6 left out. Generation and LoRA run side by side (peaks are per process;
  # their tokens/s are then indicative only), the calibration alone after them (it reads
  # device-wide used memory).
  WHEEL=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -1)
  timeout 330 $PY bench/gpu_generate.py --out "$OUT/generate" --budget-s 270 --gpu h200 \
    --models Llama-3.2-1B,gemma-3-270m-like > "$OUT/generate.log" 2>&1 &
  timeout 330 $PY bench/gpu_lora.py --out "$OUT/lora" --models Llama-3.2-1B ${WHEEL:+--wheel "$WHEEL"} \
    > "$OUT/lora.log" 2>&1 &
  wait
  timeout 130 $PY -m engine calibrate --json --output "$OUT/calibrate_h200.json" > "$OUT/calibrate.log" 2>&1
  tail -12 "$OUT/lora.log"; tail -14 "$OUT/generate.log"; tail -c 800 "$OUT/calibrate.log"
  ;;
8)
  gpu_facts
  # Speed rows one at a time (their tokens/s are the refit's data), the calibration alone
  # (device-wide used memory), then the interleaved overhead A/B. About 9.5 minutes.
  timeout 240 $PY bench/gpu_speed.py "$OUT/speed" --budget-s 220 > "$OUT/speed.log" 2>&1
  timeout 130 $PY -m engine calibrate --json --output "$OUT/calibrate_h200.json" > "$OUT/calibrate.log" 2>&1
  timeout 190 $PY bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp --steps 24 \
    --repeat 4 > "$OUT/diag_repeat.log" 2>&1
  tail -5 "$OUT/speed.log"; tail -c 800 "$OUT/calibrate.log"; tail -12 "$OUT/diag_repeat.log"
  ;;
9)
  gpu_facts
  # The matrix rows not reached on 2026-12-02 and generation at P = 4096, side by side (peaks are
  # per process; their tokens/s are then indicative only).
  timeout 330 $PY bench/gpu_estimator_matrix.py --out "$OUT/estimator_matrix.jsonl" -j 3 --steps 4 \
    --budget-s 280 --timeout-s 120 --only gpt2,bert-base-cls,Qwen2.5-0.5B,Llama-3.2-1B \
    > "$OUT/estimator_matrix.log" 2>&1 &
  timeout 330 $PY bench/gpu_generate.py --out "$OUT/generate" --budget-s 280 --gpu h200 --prompts 4096 \
    > "$OUT/generate.log" 2>&1 &
  wait
  tail -5 "$OUT/estimator_matrix.log"; tail -8 "$OUT/generate.log"
  ;;
10)
  gpu_facts
  end=$((SECONDS + 565))  # one call: the matrix, then calibrate alone, then speed rows alone
  CALL8=bench/results/verify_h200_2026-12-02/call8
  timeout 250 $PY bench/gpu_estimator_matrix.py --out "$OUT/estimator_matrix.jsonl" -j 4 --steps 4 \
    --budget-s 170 --timeout-s 110 --skip-done $CALL8/estimator_matrix_a.jsonl $CALL8/estimator_matrix_b.jsonl \
    > "$OUT/estimator_matrix.log" 2>&1
  timeout 105 $PY -m engine calibrate --json --output "$OUT/calibrate_h200.json" > "$OUT/calibrate.log" 2>&1
  left=$((end - SECONDS))
  timeout $((left > 40 ? left : 40)) $PY bench/gpu_speed.py "$OUT/speed" --budget-s $((left > 70 ? left - 35 : 35)) \
    > "$OUT/speed.log" 2>&1
  tail -3 "$OUT/estimator_matrix.log"; tail -c 600 "$OUT/calibrate.log"; tail -22 "$OUT/speed.log"
  ;;
11)
  gpu_facts
  CALL8=bench/results/verify_h200_2026-12-02/call8
  timeout 230 $PY bench/gpu_generate.py --out "$OUT/generate" --budget-s 190 --gpu h200 --prompts 4096 \
    > "$OUT/generate.log" 2>&1
  timeout 190 $PY bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp --steps 24 \
    --repeat 4 > "$OUT/diag_repeat.log" 2>&1
  if [ -n "${MATRIX_DONE:-}" ]; then
    timeout 150 $PY bench/gpu_estimator_matrix.py --out "$OUT/estimator_matrix.jsonl" -j 4 --steps 4 \
      --budget-s 100 --timeout-s 110 --skip-done $CALL8/estimator_matrix_a.jsonl $CALL8/estimator_matrix_b.jsonl \
      $MATRIX_DONE > "$OUT/estimator_matrix.log" 2>&1
  fi
  tail -8 "$OUT/generate.log"; tail -12 "$OUT/diag_repeat.log"; tail -3 "$OUT/estimator_matrix.log" 2>/dev/null
  ;;
12)
  gpu_facts
  $PY -c 'import sys; sys.path.insert(0, "bench"); from pathlib import Path
from gpu_measure_matrix import long_texts; long_texts(Path(sys.argv[1]))' "$OUT/long.jsonl"
  snap() {  # name, measure arguments: one run with a snapshot, then its peaks
    local name=$1; shift
    timeout 100 $PY -m engine measure "$@" --steps 3 --target cuda --padding fixed --json \
      --snapshot "/tmp/$name.pickle" > "$OUT/$name.json" 2> "$OUT/$name.log"
    timeout 60 $PY bench/diag_snapshot.py "/tmp/$name.pickle" > "$OUT/${name}_peaks.json" 2>> "$OUT/$name.log"
  }
  snap bert_mlm_ckpt --model bert-base-uncased --mode train --precision bf16-amp --checkpointing \
    --batch 8 --seq 512 --dataset "$OUT/long.jsonl"
  snap bert_mlm --model bert-base-uncased --mode train --precision bf16-amp --batch 8 --seq 512 --dataset builtin
  snap bert_cls_ckpt --model bert-base-uncased --task classification --mode train --precision bf16-amp \
    --checkpointing --batch 8 --seq 512 --dataset "$OUT/long.jsonl"
  snap gemma_bf16 --model bench/configs/gemma-3-270m-like --mode train --precision bf16-amp --batch 8 --seq 512 \
    --dataset builtin
  snap bert_mlm_fp32 --model bert-base-uncased --mode train --precision fp32 --batch 4 --seq 512 \
    --dataset "$OUT/long.jsonl"
  for f in "$OUT"/*_peaks.json; do echo "$f"; head -c 1500 "$f"; echo; done
  ;;
13)
  # 12 again with fewer files (the device returns 8): compact peaks on stdout, and the cross-entropy
  # op by op under autocast.
  timeout 60 $PY bench/diag_cross_entropy.py 2>&1 | tee "$OUT/cross_entropy.log"
  timeout 60 $PY bench/diag_cross_entropy.py --v 262144 2>&1 | tee -a "$OUT/cross_entropy.log"
  $PY -c 'import sys; sys.path.insert(0, "bench"); from pathlib import Path
from gpu_measure_matrix import long_texts; long_texts(Path(sys.argv[1]))' /tmp/long.jsonl
  for spec in "bert_mlm|--model bert-base-uncased --batch 8 --dataset builtin" \
              "gemma_bf16|--model bench/configs/gemma-3-270m-like --batch 8 --dataset builtin"; do
    name=${spec%%|*}
    timeout 100 $PY -m engine measure ${spec#*|} --mode train --precision bf16-amp --seq 512 --steps 3 \
      --target cuda --padding fixed --json --snapshot "/tmp/$name.pickle" 2>/dev/null | tail -1 | cut -c1-400
    echo "$name: $(timeout 60 $PY bench/diag_snapshot.py "/tmp/$name.pickle" --compact --top 10)" | tee -a "$OUT/peaks.log"
  done
  ;;
14)
  for spec in "gemma_bf16|--model bench/configs/gemma-3-270m-like --mode train --precision bf16-amp --batch 8 --seq 512" \
              "llama_infer_fp32|--model Llama-3.2-1B --mode infer --precision fp32 --batch 8 --seq 1024" \
              "qwen_bf16|--model Qwen2.5-0.5B --mode train --precision bf16-amp --batch 8 --seq 512"; do
    name=${spec%%|*}
    timeout 100 $PY -m engine measure ${spec#*|} --steps 3 --target cuda --padding fixed --dataset builtin \
      --json --snapshot "/tmp/$name.pickle" 2>/dev/null | tail -1 > "$OUT/$name.json"
    echo "$name: $(timeout 60 $PY bench/diag_snapshot.py "/tmp/$name.pickle" --compact --top 8 \
      --events-out "$OUT/${name}_events.json.gz")" | tee -a "$OUT/peaks.log"
  done
  ;;
15)
  gpu_facts
  timeout 60 $PY bench/diag_grad_accumulate.py 2>&1 | tee "$OUT/grad_accumulate.log"
  gemma_generate 260
  ;;
16)
  gpu_facts
  # allocator traces of the rows whose reserved the 2026-12-02 (fourth) build/workspace replay
  # moved most (Qwen LoRA +0.3 -> +10.6%, Llama SGD -4.5%, qwen3 inference -4.7%, bert-cls -3.4%)
  traces "${LONG_TRACES[@]}" "bertcls_bf16|--model bert-base-uncased --task classification --precision bf16-amp --batch 8 --seq 512 --dataset builtin"
  heldout_rows heldout heldout_a 380
  cut -c1-300 "$OUT/peaks.log"
  pack part16
  ;;
17)
  gpu_facts
  # 16's traces of the long-text rows (its text file was not written), then the held-out rows it
  # did not reach (HELDOUT_DONE: its output, in the tree)
  traces "${LONG_TRACES[@]}"
  heldout_rows heldout heldout_b 440 ${HELDOUT_DONE:-}
  cut -c1-200 "$OUT/peaks.log"
  pack part17
  ;;
18)
  gpu_facts
  # 15's runs: in-place tied-gradient sums on CUDA, Gemma-3-like generation at P = 4096
  timeout 60 $PY bench/diag_grad_accumulate.py 2>&1 | tee "$OUT/grad_accumulate.log"
  gemma_generate 130
  pack part18
  ;;
19)
  gpu_facts
  [ -n "${SKIP_TRACE:-}" ] || NO_STACKS=1 traces "bertmlm_ckpt_bf16|--model bert-base-uncased --precision bf16-amp --checkpointing --batch 16 --seq 512 --dataset builtin"
  heldout_rows heldout2 heldout2 ${HELDOUT2_BUDGET:-260} ${HELDOUT2_DONE:-}
  [ -z "${WITH_GENERATE:-}" ] || gemma_generate 130
  [ ! -f "$OUT/peaks.log" ] || cut -c1-300 "$OUT/peaks.log"
  pack part19
  ;;
*) echo "usage: bash bench/gpu_verify.sh 1|2|...|19"; exit 2 ;;
esac
