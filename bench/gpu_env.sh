# Source this on the GPU machine (bash, repo root). The machine has torch and transformers but not
# trl, datasets, rouge_score, optuna, liger-kernel or gguf, and cannot reach a registry; one call
# carries at most 64 MiB. So the wheels and the embedded models' GGUF files travel as one tar split
# into ~62 MB chunks, one carried folder `.gpuchunk-N` per call (made with bench/gpu_stash.sh), stashed
# under /root (kept while the machine stays warm); once every chunk is there this unpacks them,
# installs the wheels into /root/extra/site-packages and puts the GGUF files into the harness cache.
# Wheels go into a folder whose path contains "site-packages": dill (through datasets) pickles
# modules from any other --target folder by value and fails on pyarrow (unsloth PR #9791).
# /root/convert/site-packages holds transformers 5.23 and its needs, for GGUF conversion only
# (the machine's transformers 5.17 converts Gemma 3 into a broken model).
K=/root/chunks
mkdir -p "$K" && for d in .gpuchunk-*; do [ -d "$d" ] && cp "$d"/chunk.* "$K/"; done
export PYTHONPATH=/root/extra/site-packages:$PWD HARNESS_CACHE=/root/hcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
CHUNKS_EXPECTED=${CHUNKS_EXPECTED:-8}
if [ ! -f /root/stash/.unpacked ] && [ "$(ls "$K" | wc -l)" -ge "$CHUNKS_EXPECTED" ]; then
  mkdir -p /root/stash && cat $(ls "$K"/chunk.* | sort -t. -k2 -n) | tar -x -C /root/stash && touch /root/stash/.unpacked
fi
if [ -f /root/stash/.unpacked ] && [ ! -f /root/extra/site-packages/.installed ]; then
  S=/root/stash
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/extra/site-packages "$S"/whl/*.whl
  python3 -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null || \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/extra/site-packages "$S"/whl-arrow/*.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/convert/site-packages "$S"/whl-convert/*.whl
  mkdir -p "$HARNESS_CACHE/gguf" && cp -n "$S"/gguf/*.gguf "$HARNESS_CACHE/gguf/"
  touch /root/extra/site-packages/.installed
fi
# Run a command with transformers 5.23 (conversion only): with_convert_env python3 -m harness fetch-model gemma3-270m
with_convert_env() { PYTHONPATH=/root/convert/site-packages:$PYTHONPATH "$@"; }
