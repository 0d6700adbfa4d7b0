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
for f in .gpustash/chunk.*; do i=${f##*.}; mkdir -p .gpuchunk-$i; mv "$f" .gpuchunk-$i/; done
last=$((n - 1))
if [ "$last" -gt 0 ] && [ "$(stat -c %s .gpuchunk-$last/chunk.$last)" -lt 2000000 ]; then  # a small tail rides along
  mv .gpuchunk-$last/chunk.$last .gpuchunk-$((last - 1))/ && rmdir .gpuchunk-$last
fi
rm -rf .gpustash
ls -la .gpuchunk-*/ && echo "carry each .gpuchunk-N in its own call; CHUNKS_EXPECTED=$n"
