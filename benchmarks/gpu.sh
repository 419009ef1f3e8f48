#!/usr/bin/env bash
# Both benchmarks on a bare GPU box (torch, pyarrow, pillow; no Ray, no MLflow), written under
# benchmarks/results/ with the device's name, ready to commit:
#   bash benchmarks/gpu.sh            # then: git add benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
out=benchmarks/results/${name}-128px
python -m benchmarks.train_step --size 128 --batch 64 --device cuda | tee "${out}.jsonl.tmp"
mv "${out}.jsonl.tmp" "${out}.jsonl"
python -m benchmarks.data --size 128 | tee "${out}-data.jsonl.tmp"
mv "${out}-data.jsonl.tmp" "${out}-data.jsonl"
