#!/usr/bin/env bash
# Data-parallel checks (issue 18) on a lent multi-GPU machine (issue 20), NCCL: DDP and FSDP2
# (reshard on/off, optimizer and parameter offload, mixed precision) measured per rank through
# torch.distributed.run and compared with both estimators. Run from the repository root with $OUT:
#   bash bench/gpu_distributed.sh 2      # 2 GPUs (about 6 minutes)
#   bash bench/gpu_distributed.sh 8      # 8 GPUs
set -u
n="${1:?usage: bash bench/gpu_distributed.sh N_GPUS}"
: "${OUT:?set OUT to an output folder}"
export PYTHONPATH=. TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
timeout 580 python3 bench/gpu_distributed.py --gpus "$n" --out "$OUT" > "$OUT/distributed.log" 2>&1
tail -n 20 "$OUT/distributed.log"
