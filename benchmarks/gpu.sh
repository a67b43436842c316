#!/usr/bin/env bash
# One-GPU training-step benchmark (written for an H100/H200; under 5 minutes, limits below):
#   CLIP and DeCLIP (and open_clip's CLIP for reference) with ViT-B/32 and RN50 at 224 px, batch 256, bf16 autocast,
#   eager and torch.compile: samples/s, peak memory (max_memory_allocated), MFU from FlopCounterMode FLOPs of one
#   step / step time / peak FLOP/s, host syncs per step. Results are appended to reports/performance.md (+ .csv),
#   one block per run with the date and the device. Then benchmarks/memory.py: peak memory of a large batch at once
#   against accumulated micro-batches (cached features), and gradient checkpointing off / on. Then benchmarks/pipeline.py:
#   one worker's samples/s with views finished in the worker or on the device, and the device stage timed on the GPU;
#   then real DeCLIP training steps fed by real loaders both ways (samples/s, share of the run waiting for data).
#
#   bash benchmarks/gpu.sh                        # defaults below
#   PEAK_FLOPS=312e12 bash benchmarks/gpu.sh      # A100 dense bf16; H100/H200 SXM dense bf16 is 989e12
#   bash benchmarks/gpu.sh --device cpu --batch 4 --image_size 64 --quick    # dry run of the same path on a CPU
#
# Extra arguments go to both benchmarks/step.py calls (later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PEAK=${PEAK_FLOPS:-989e12}
BATCH=${BATCH:-256}
EAGER_LIMIT=${EAGER_LIMIT:-100}       # seconds (expected: about 60 on an H200)
COMPILE_LIMIT=${COMPILE_LIMIT:-180}   # seconds; compiling takes ~1 min per model, so RN50 starts only if ViT-B/32 was done
                                      # within COMPILE_DEADLINE; what was measured before a timeout is kept
COMPILE_DEADLINE=${COMPILE_DEADLINE:-60}
COMMON=(--device cuda --precision bf16 --batch "$BATCH" --image_size 224 --context_length 77 --archs vit-b32,rn50
        --peak_flops "$PEAK" --report_mode append --pipeline off)

echo "== eager: open_clip CLIP, declip CLIP and DeCLIP (+ without the trainer's per-step .item())"
timeout --signal=INT --kill-after=15 "$EAGER_LIMIT" "$PY" benchmarks/step.py "${COMMON[@]}" --methods open_clip,clip,declip \
    --compile off --sync_variant --reps 10 --warmup 3 --section gpu-eager "$@" || echo "eager run stopped: status $?"

echo "== torch.compile: declip CLIP and DeCLIP, eager beside compiled in one process"
timeout --signal=INT --kill-after=15 "$COMPILE_LIMIT" "$PY" benchmarks/step.py "${COMMON[@]}" --methods clip,declip \
    --compile both --reps 10 --warmup 3 --audit off --section gpu-compile \
    --deadline_s "$COMPILE_DEADLINE" "$@" || echo "compile run stopped: status $?"

echo "== memory: ViT-B/32 DeCLIP and CLIP, batch 512 at once vs 128 x accum_steps 4 (cached features), checkpointing off/on"
timeout --signal=INT --kill-after=15 "${MEMORY_LIMIT:-120}" "$PY" benchmarks/memory.py --device cuda --arch vit-b32 --precision bf16 \
    --batch "${MEMORY_BATCH:-512}" --accum 4 --threads 8 || echo "memory run stopped: status $?"

echo "== data pipeline: one worker's rate at 224 px (views in the worker / on the device), the device stage on the GPU"
timeout --signal=INT --kill-after=15 "${PIPELINE_LIMIT:-240}" "$PY" benchmarks/pipeline.py --device cuda --stage_reps 10 \
    || echo "pipeline run stopped: status $?"

echo "== end to end: DeCLIP ViT-B/32 steps fed by real loaders (256-px JPEGs), views in the worker vs on the device"
timeout --signal=INT --kill-after=15 "${E2E_LIMIT:-300}" "$PY" benchmarks/pipeline.py --end_to_end --device cuda \
    --workers "${WORKERS:-$(( $(nproc) - 2 ))}" || echo "end-to-end run stopped: status $?"

echo "== done: blocks 'gpu-eager', 'gpu-compile', 'memory.py arch=vit-b32 device=cuda', 'pipeline.py device=cuda' and 'pipeline.py end-to-end device=cuda' of reports/performance.md"
