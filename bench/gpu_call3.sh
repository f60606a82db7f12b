set -x
export PYTHONPATH=.
( timeout 200 python3 bench/gpu_measure_matrix.py --quick --out $OUT/cross.jsonl --steps 10 --budget-s 180 --timeout-s 60 > $OUT/cross.log 2>&1 )
( python3 -m engine measure --model gpt2 --mode train --batch 8 --seq 64 --precision bf16-amp --steps 30 --json | tail -1 | python3 -c "import json,sys;d=json.load(sys.stdin);print('engine 8x64', d['step_time_s'], d['tokens_per_s'], d['peak_allocated_bytes'])"
  python3 bench/bare_loop.py --model gpt2 --batch 8 --seq 64 --precision bf16-amp --steps 30 | tail -1 | cut -c1-400 ) > $OUT/floor.log 2>&1
timeout 330 python3 bench/gpu_techniques.py --out $OUT/techniques.jsonl --md $OUT/techniques.md --timeout 100 > $OUT/techniques.log 2>&1
tail -3 $OUT/cross.log; cat $OUT/floor.log; tail -30 $OUT/techniques.log
