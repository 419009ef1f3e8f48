#!/usr/bin/env bash
# Every speed figure on a bare GPU box (torch, pyarrow, pillow; no Ray, no MLflow), written
# under benchmarks/results/ with the device's name, ready to commit. About 8 minutes on an H100.
#   mkdir -p data/celeba-sample && cp ../shared/data/celeba-sample/{img_align_celeba.zip,list_eval_partition.txt} data/celeba-sample/
#   then, on the GPU box (the device tool: carry data/celeba-sample):
#   bash benchmarks/gpu.sh            # then: git add benchmarks/results/
# QUALITY=1 also runs the GPU quality protocol (issue 16: ~2 x 3 runs, longer).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
out=benchmarks/results/${name}-128px
run() {  # run NAME CMD...: stdout to NAME.jsonl, whole or not at all
  local file=$1; shift
  "$@" | tee "${file}.tmp"
  mv "${file}.tmp" "${file}"
}
# The step: the fair eager reference, the project's step with each switch, all switches.
run "${out}.jsonl" python -m benchmarks.train_step --size 128 --batch 64 --device cuda
run "${out}-b128.jsonl" python -m benchmarks.train_step --size 128 --batch 128 --device cuda \
    --variants eager_fp32_reference,project+all
# The real loop on real JPEG shards (converts the sample into data/celeba128 on first use):
# loader processes (auto) and, to compare, decoding in the training process.
{
  python -m benchmarks.loop --size 128 --device cuda --steps 600
  python -m benchmarks.loop --size 128 --device cuda --steps 600 --loader-workers 0
} | tee "${out}-loop.jsonl.tmp"
mv "${out}-loop.jsonl.tmp" "${out}-loop.jsonl"
src=data/celeba-sample/img_align_celeba.zip
run "${out}-data.jsonl" python -m benchmarks.data --size 128 $([ -f "$src" ] && echo "--src $src")
if [ "${QUALITY:-0}" = 1 ]; then
  run "benchmarks/results/quality-${name}.jsonl" python -m benchmarks.quality --size 128 --width 1 \
      --device cuda --data data/celeba128 --variants seed,ttur,faces128 --seeds 2 \
      --out "benchmarks/results/quality-${name}"
fi
