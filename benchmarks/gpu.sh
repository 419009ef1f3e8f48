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
# The GPU quality protocol (issue 16's target: configs/faces128.toml, FID <= 31 on the sample);
# needs data/celeba128 (python -m datasets.celeba ... --size 128), ~2 x 3 runs.
if [ -f data/celeba128/val/manifest.json ]; then
  python -m benchmarks.quality --size 128 --width 1 --device cuda --data data/celeba128 \
      --variants seed,ttur,faces128 --seeds 2 --out benchmarks/results/quality-${name} \
      | tee "benchmarks/results/quality-${name}.jsonl.tmp"
  mv "benchmarks/results/quality-${name}.jsonl.tmp" "benchmarks/results/quality-${name}.jsonl"
fi
