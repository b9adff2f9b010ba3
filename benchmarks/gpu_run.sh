#!/usr/bin/env bash
# One call on the lent GPU (device tool): install jaxinterp from the travelling tree into
# the machine's own Python (it has jax, torch, transformers; nothing can be downloaded),
# then run the attribution benchmark. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
EXAMPLES=${EXAMPLES:-256}
python3 benchmarks/bench_attribution.py --examples "$EXAMPLES" --batch-size 32 --repeats 3 \
    --methods EAP,EAP-IG-inputs,EAP-IG-activations --out "$OUT/attribution_gpu_b32.json"
python3 benchmarks/bench_attribution.py --examples "$EXAMPLES" --batch-size 128 --repeats 3 \
    --methods EAP,EAP-IG-inputs --out "$OUT/attribution_gpu_b128.json"
