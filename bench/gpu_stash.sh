#!/usr/bin/env bash
# Build the carried chunks that bench/gpu_env.sh unpacks on the GPU machine: the wheels the machine lacks
# (.whl: trl, datasets, rouge_score, optuna, liger-kernel, gguf and needs; .whl-arrow: pyarrow 24;
# .whl-convert: transformers 5.23 and its needs) and the embedded models' GGUF files from the cache, as one
# tar in 62 MB chunks (.gpuchunk-0, -1, ...: carry one per call, in consecutive calls; the last takes the tail).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${HARNESS_CACHE:-$HOME/.cache/harness}
rm -rf .gpustash .gpuchunk-* && mkdir -p .gpustash/gguf
cp -r .whl .gpustash/whl && cp -r .whl-arrow .gpustash/whl-arrow && cp -r .whl-convert .gpustash/whl-convert
cp "$cache"/gguf/*.gguf .gpustash/gguf/
tar -cf - -C .gpustash . | split -b 62000000 -d -a 1 - .gpustash/chunk.
n=$(ls .gpustash/chunk.* | wc -l)
for f in .gpustash/chunk.*; do i=${f##*.}; d=$(( i < n - 1 ? i : (i > 0 && $(stat -c %s "$f") < 8000000 ? i - 1 : i) )); mkdir -p .gpuchunk-$d; mv "$f" .gpuchunk-$d/; done
rm -rf .gpustash
ls -la .gpuchunk-*/ && echo "carry each .gpuchunk-N in its own call; CHUNKS_EXPECTED=$n"
