#!/usr/bin/env bash
# The benchmarks with --device cuda (issue 4, item 4), from the repository root
# on a machine with a CUDA GPU; logs, tables and galleries go to OUT_DIR.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [main|sets|paths]
#
# main: 1. the `peer` set (3,000 x 64 px, K = 20), scored against the simulation's truth;
#       2. the E-step alone, 32x the CPU's particles per chunk, next to torch.matmul there;
#       3. 100,000 x 128 px (a 6.6 GB stack tiled from 2,000 simulated images, fresh noise
#          per copy), K = 100, the default schedule (20 online iterations of 100 particles a
#          class, then 1 full iteration).
# sets: the second held-out-style set (4,000 x 96 px, K = 30) and the 20,000-particle sets
#       (64 and 128 px, K = 50) of benchmarks/README.md, simulated side by side, then
#       classified one at a time.
# paths: the other entry points on the GPU: the demo, a job killed after 12 s then run again
#       with --resume (its checkpoint loaded onto the GPU), and a stream over the demo's particles.
set -u -o pipefail
out=${1:-benchmarks/_cache/gpu}
stage=${2:-main}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cache=benchmarks/_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

if [ "$stage" = main ]; then
    timeout 150 "$py" benchmarks/quality.py --preset peer --same-mask --skip-relion --no-readme \
        --classify-args "--device cuda" 2>&1 | tee "$out/peer.log" || exit 1
    cp "$(ls -d $cache/cryo2d/peer-*-c* | head -1)/gallery.png" "$out/peer_gallery.png"
    timeout 120 "$py" benchmarks/estep.py --device cuda --batch-scale 32 --threads 16 2>&1 | tee "$out/estep.log"
    timeout 300 "$py" benchmarks/memory.py --sizes 100000 --box 128 --classes 100 --base 2000 --threads 16 \
        --online-iterations 20 --batch-per-class 100 --full-iterations 1 --classify-args "--device cuda" \
        2>&1 | tee "$out/big.log"
    job=$cache/memory/tiled-n100000-b128-base2000-s0/job-n100000-K100
    cp "$job/iterations.jsonl" "$out/big_iterations.jsonl"
    cp "$job/gallery.png" "$out/big_gallery.png"
elif [ "$stage" = sets ]; then
    sets=("--preset small -n 4000 --box 96 --snr 0.1 --junk-fraction 0.15 --classes 30 --n-views 16 --seed 11"
          "-n 20000 -K 50" "-n 20000 --box 128 -K 50")
    for s in "${sets[@]}"; do  # the simulations side by side (each is one process)
        timeout 240 "$py" benchmarks/quality.py $s --skip-cryo2d --skip-relion --no-readme >/dev/null 2>&1 &
    done
    wait
    i=0
    for s in "${sets[@]}"; do
        i=$((i + 1))
        timeout 150 "$py" benchmarks/quality.py $s --skip-relion --no-readme --classify-args "--device cuda" \
            2>&1 | tee "$out/set$i.log"
    done
    cp "$(ls -d $cache/cryo2d/small-*-b96-*-c* | head -1)/gallery.png" "$out/set1_gallery.png"
elif [ "$stage" = paths ]; then
    d=$cache/gpu-paths
    rm -rf "$d"
    timeout 120 "$py" -m cryo2d demo -o "$d/demo" --device cuda 2>&1 | tee "$out/demo.log" || exit 1
    cp "$d/demo/job/gallery.png" "$out/demo_gallery.png"
    star=$d/demo/data/particles.star
    timeout -s KILL 12 "$py" -m cryo2d classify "$star" -o "$d/resumed" --classes 12 --device cuda \
        --online-iterations 40 > "$out/resume.log" 2>&1
    echo "killed after 12 s: $(wc -l < "$d/resumed/iterations.jsonl") iterations logged" | tee -a "$out/resume.log"
    timeout 120 "$py" -m cryo2d classify "$star" -o "$d/resumed" --classes 12 --device cuda \
        --online-iterations 40 --resume 2>&1 | tee -a "$out/resume.log"
    cp "$d/resumed/iterations.jsonl" "$out/resumed_iterations.jsonl"
    timeout 120 "$py" -m cryo2d stream "$star" -o "$d/stream" --classes 12 --device cuda --settle-seconds 0 \
        --stop-when-idle 5 2>&1 | tee "$out/stream.log"
    ls "$d/stream" | tee -a "$out/stream.log"
fi
