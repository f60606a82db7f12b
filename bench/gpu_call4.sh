# Last H100 call of 2026-11-25: the runs the earlier calls' budgets cut short.
export PYTHONPATH=.
python3 bench/gpu_batching.py --out $OUT/batching2.jsonl --budget-s 285 --only gpt2/token-budget,gpt2/token-budget+pad64,gpt2/chunked,gpt2/plain,Qwen2.5-0.5B/fixed,Qwen2.5-0.5B/token-budget,Qwen2.5-0.5B/token-budget+pad64 > $OUT/batching2.log 2>&1
timeout 165 python3 bench/gpu_techniques.py --part model --out $OUT/techniques2.jsonl --md $OUT/techniques2.md --timeout 60 --only "checkpointing,distill,T=1024,infer,alloc" > $OUT/techniques2.log 2>&1
timeout 110 python3 bench/gpu_export_check.py --models gpt2 --out $OUT/export_check.jsonl > $OUT/export_check.log 2>&1
grep "^\[" $OUT/batching2.log; tail -12 $OUT/techniques2.log; tail -8 $OUT/export_check.log
