#!/usr/bin/env bash
# One call on the lent GPU (device tool): install jaxinterp from the travelling tree into
# the machine's own Python (it has jax, torch, transformers; nothing can be downloaded),
# then run the benchmarks. Results land in $OUT. Budget: well under 10 minutes on an H100/H200.
#   1. GPT-2-small shape (random weights), batch 32 and 128: EAP / EAP-IG-inputs /
#      EAP-IG-activations throughput, and circuit evaluation (10 nested circuits, MIB's
#      0.1%..100% range, 8 per vectorised forward); at batch 32 one more batch of each is
#      traced (jax.profiler; traces stay on the machine) and the JSON rows carry a summary
#      of the longest kernels, for the sessions without a GPU to work from;
#   2. Llama-3-8B shape, weights drawn on the device (bfloat16), EAP-IG-inputs (5 steps) at
#      batch 8 x 64 tokens: examples/s, peak GPU memory, MFU against PEAK_TFLOPS (dense
#      bf16 peak of the card; 989 for an H100/H200 SXM).
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
EXAMPLES=${EXAMPLES:-256}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
python3 benchmarks/bench_attribution.py --examples "$EXAMPLES" --batch-size 32 --repeats 3 \
    --methods EAP,EAP-IG-inputs,EAP-IG-activations --eval-circuits 10 --out "$OUT/attribution_gpu_b32.json" \
    --profile /tmp/jaxinterp_traces
python3 benchmarks/bench_attribution.py --examples "$EXAMPLES" --batch-size 128 --repeats 3 \
    --methods EAP,EAP-IG-inputs --eval-circuits 10 --out "$OUT/attribution_gpu_b128.json"
timeout 300 python3 benchmarks/bench_large.py --shape llama-3-8b --init device --dtype bfloat16 --batch-size 8 \
    --pos 64 --method EAP-IG-inputs --batches 2 --peak-tflops "$PEAK_TFLOPS" --out "$OUT/large_llama3_8b_gpu.json"
