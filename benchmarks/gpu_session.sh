#!/usr/bin/env bash
# The GPU checks and measurements of the Triton backend in one go, for a CUDA machine with torch, triton and
# pytest installed (the checkout's src on PYTHONPATH, no install needed); each step time-limited, its output kept:
#   benchmarks/gpu_session.sh OUT_DIR [steps]     steps: any of info,test,host,kernels,sweep,norms,normsweep,bench
#                                                 (default: all)
set -u
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [info,test,host,kernels,sweep,norms,normsweep,bench]}
steps=${2:-info,test,host,kernels,sweep,norms,normsweep,bench}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
has() { [[ ",$steps," == *",$1,"* ]]; }
step() {  # step NAME SECONDS COMMAND...: run, log to OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"; tail -n 25 "$out/$name.log"
}
if has info; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
fi
has test && step test 120 env NORMLAB_TRITON_CUDA=1 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 tests/triton_backend.py
has host && step host 60 python3 benchmarks/gpu_host.py
has kernels && step kernels 150 python3 benchmarks/gpu_kernels.py --budget 0.04 --json "$out/kernels.json"
has sweep && step sweep 120 python3 benchmarks/gpu_kernels.py --sweep --budget 0.04 --json "$out/sweep.json"
has norms && step norms 90 python3 benchmarks/gpu_kernels.py --norms --budget 0.04 --json "$out/norms.json"
has normsweep && step normsweep 120 python3 benchmarks/gpu_kernels.py --norms-sweep --budget 0.04 --json "$out/normsweep.json"
has bench && step bench 150 python3 -m normlab bench --sections gpu --budget 0.2 --json "$out/bench_gpu.json"
exit 0
