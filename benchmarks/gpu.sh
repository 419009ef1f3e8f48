#!/usr/bin/env bash
# Every speed figure on a bare GPU box (torch, pyarrow, pillow; no Ray, no MLflow), written
# under benchmarks/results/ (or $RESULTS) with the device's name, ready to commit. About 8
# minutes on an H100; each part has its own time limit, so a slow or failing part costs only
# its own figures, and the most wanted figures come first.
#   mkdir -p data/celeba-sample && cp ../shared/data/celeba-sample/{img_align_celeba.zip,list_eval_partition.txt} data/celeba-sample/
#   then, on the GPU box (the device tool: carry data/celeba-sample):
#   bash benchmarks/gpu.sh            # then: git add benchmarks/results/
# QUALITY=1 also runs the GPU quality protocol (~2 x 3 runs, longer); SPEEDRUN=1 the 30-minute
# 128 px speedrun (SPEEDRUN=1 bash benchmarks/gpu.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${RESULTS:-benchmarks/results}
mkdir -p "$results"
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
out=${results}/${name}-128px
run() {  # run SECONDS FILE CMD...: stdout to FILE, whole (FILE) or as far as it got (FILE.partial)
  local limit=$1 file=$2; shift 2
  if timeout "$limit" "$@" | tee "${file}.partial"; then mv "${file}.partial" "${file}"
  else echo "gpu.sh: $* failed or passed ${limit}s; what it printed is in ${file}.partial" >&2; fi
}
# Is the CUDA-graphed step the eager one (perf.cuda_graphs)? Then where the step's time goes.
run 120 "${out}-graphs.jsonl" python -m benchmarks.graph_check --size 128
# The step: the fair eager reference, the project's step with each switch, all switches.
run 200 "${out}.jsonl" python -m benchmarks.train_step --size 128 --batch 64 --device cuda
# The real loop on real JPEG shards (converts the sample into data/celeba128 on first use):
# loader processes (auto) and, to compare, decoding in the training process.
timeout 150 python -c "from benchmarks.quality import ensure_data; ensure_data(None, 128)" >/dev/null \
    || echo "gpu.sh: converting the CelebA sample failed or passed 150s" >&2
run 120 "${out}-loop.jsonl" python -m benchmarks.loop --size 128 --device cuda --steps 600 --cuda-graphs auto
run 100 "${out}-loop-nographs.jsonl" python -m benchmarks.loop --size 128 --device cuda --steps 600 --cuda-graphs off
run 60 "${out}-profile.jsonl" python -m benchmarks.profile_step --size 128 --batch 64
run 80 "${out}-loop-inprocess.jsonl" python -m benchmarks.loop --size 128 --device cuda --steps 600 --loader-workers 0
run 80 "${out}-b128.jsonl" python -m benchmarks.train_step --size 128 --batch 128 --device cuda \
    --variants eager_fp32_reference,project+all-graphs,project+all
# What a checkpoint of the seed model costs the training thread: in the loop vs off it.
run 60 "${out}-checkpoint.jsonl" python -m benchmarks.checkpoint --size 128 --device cuda
src=data/celeba-sample/img_align_celeba.zip
run 60 "${out}-data.jsonl" python -m benchmarks.data --size 128 $([ -f "$src" ] && echo "--src $src")
if [ "${QUALITY:-0}" = 1 ]; then
  run 3000 "${results}/quality-${name}.jsonl" python -m benchmarks.quality --size 128 --width 1 \
      --device cuda --data data/celeba128 --variants seed,ttur,faces128 --seeds 2 \
      --out "${results}/quality-${name}"
fi
# SPEEDRUN=1: the 128 px preset on the sample protocol for 30 minutes of training; prints its FID.
if [ "${SPEEDRUN:-0}" = 1 ]; then
  run 2400 "${results}/speedrun128-${name}.jsonl" python -m benchmarks.quality --size 128 --width 1 \
      --device cuda --data data/celeba128 --variants faces128 --minutes 30 --n 2000 \
      --out "${results}/speedrun128-${name}"
fi
