#!/usr/bin/env bash
# The checks that need a CUDA GPU (CI never runs this). From the repository root:
#     bash tests/gpu_check.sh            # about 5 minutes on one H100
# 1. throughput: 300 pretraining steps of the 124m preset in bfloat16 with torch.compile
#    (tokens/s and MFU on the last log line);
# 2. float16 with its gradient scaler, a few steps;
# 3. the toy pipeline end to end on the GPU, then infer.py on its files;
# 4. the toy pipeline sharded with --fsdp over every GPU (FSDP2, bfloat16 through FSDP's own policy),
#    where there are two or more.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/taia_gpu_check}
rm -rf "$OUT"
python -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: no CUDA GPU here'); \
print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

echo "== 1. 124m preset, bfloat16, compile =="
# The toy tokenizer (768 pieces) stands in for Llama's 32k: 86M parameters, 85M of them in the blocks.
python train.py --out_dir "$OUT/124m" --stage pretrain --preset 124m --seq_len 1024 --batch_tokens 131072 \
    --micro_batch 16 --pretrain_steps 300 --pretrain_lr 6e-4 --device cuda --dtype bfloat16 --compile \
    --log_interval 50 --save_interval 0 2>&1 | grep -E "model:|step"

echo "== 2. float16 + GradScaler =="
python train.py --out_dir "$OUT/fp16" --pretrain_steps 30 --finetune_steps 10 --device cuda --dtype float16 \
    --log_interval 10 --modes base,taia 2>&1 | grep -E "step|ood_test"

echo "== 3. toy pipeline on the GPU =="
time python train.py --out_dir "$OUT/toy" --device cuda 2>&1 | grep -vE "^\s*$"
python infer.py --out_dir "$OUT/toy" --device cuda --modes base,vanilla,taia --eval "$OUT/toy/data/ood_test.jsonl" \
    --prompt "Instruction: city for Kalo? Response:"
echo "== 4. FSDP2 (--fsdp) on every GPU of this machine, the toy pipeline, bfloat16 =="
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then
    echo "skipped: one GPU, nothing to shard"
else
    torchrun --standalone --nproc_per_node "$GPUS" train.py --out_dir "$OUT/fsdp" --device cuda --dtype bfloat16 \
        --fsdp --log_interval 100 2>&1 | grep -E "sharded over|step|ood_test|wall time"
fi
echo "gpu_check: done"
