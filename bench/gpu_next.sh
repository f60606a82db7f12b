# The GPU runs the 2026-11-25 session could not make (its 30 minutes were spent); one H100 call of
# ~9 minutes, most important first. Run from the repository root with $OUT set:
#   bash bench/gpu_next.sh
export PYTHONPATH=.
# Issue 3: why the engine's step is 13-16% slower than the bare loop on these two (loop vs data).
timeout 120 python3 bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp --steps 12 > $OUT/diag_bert.log 2>&1
timeout 120 python3 bench/diag_step_overhead.py --model Qwen2.5-0.5B --precision bf16-amp --checkpointing --steps 8 > $OUT/diag_qwen.log 2>&1
# Issue 3: the two Llama-3.2-1B inference rows of the matrix, with their bare-loop cross-check.
timeout 90 python3 bench/gpu_measure_matrix.py --models Llama-3.2-1B --modes infer --out $OUT/llama_infer.jsonl --steps 10 --budget-s 80 > $OUT/llama_infer.log 2>&1
# Issue 8: export vs measure with more steps (5 timed steps were too few to compare tokens/s).
timeout 150 python3 bench/gpu_export_check.py --steps 20 --out $OUT/export_check.jsonl > $OUT/export_check.log 2>&1
# Issue 6: FFN chunking in inference; allocator settings with dynamic shapes.
timeout 60 python3 bench/gpu_techniques.py --part model --only "infer" --timeout 50 --out $OUT/techniques_infer.jsonl > $OUT/techniques_infer.log 2>&1
for alloc in default expandable; do
  timeout 60 python3 -m engine measure --model gpt2 --mode train --precision bf16-amp --padding dynamic --batch 8 --seq 512 --steps 200 --alloc $alloc --target cuda --json | tail -1 > $OUT/alloc_dynamic_$alloc.json
done
tail -3 $OUT/*.log
# Second call (issue 5, ~6 minutes): the batching rows the budget cut.
#   PYTHONPATH=. python3 bench/gpu_batching.py --out $OUT/batching3.jsonl --budget-s 540 \
#     --only gpt2/bucketed+pad64,Qwen2.5-0.5B/dynamic,Qwen2.5-0.5B/bucketed,Qwen2.5-0.5B/bucketed+pad64
