#!/usr/bin/env bash
# The runtime's CUDA path on a GPU machine, in one short run (~5 min): the gpu-marked tests (pinned host tier,
# side-stream copy and decode on the device, events, concurrency), then the runtime benchmark on a synthetic
# 512x1408 container (the reference model would have to be trained first). Results go to $OUT (or
# bench/results) as gpu_check.log and runtime_gpu.{json,md}.
#
#     bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
log="$out/gpu_check.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,pci.bus_id --format=csv || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$log"

status=0
timeout 300 python -m pytest tests/test_cuda.py -m gpu -q -rs -p no:cacheprovider 2>&1 | tee -a "$log" || status=1

PRISM_CACHE="${PRISM_CACHE:-/tmp/prism-cache}" timeout 240 python bench/bench_runtime.py --device cuda --synthetic \
  --threads 4 --tokens 32 --repeats 2 --name runtime_gpu 2>&1 | tee -a "$log" || status=1
cp bench/results/runtime_gpu.json bench/results/runtime_gpu.md "$out"/ 2>/dev/null || true
echo "gpu_check exit status $status" | tee -a "$log"
exit $status
