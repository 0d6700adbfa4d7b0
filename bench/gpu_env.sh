# Source this on the GPU machine (bash, repo root) after the carry calls described in
# bench/RESULTS.md: installs the carried wheels once into /root/extra/site-packages and assembles the embedded
# model's gguf (carried in two halves: the file is over one call's carry limit).
# Wheels go into a folder whose path contains "site-packages": dill (through datasets) pickles
# modules from any other --target folder by value and fails on pyarrow (unsloth PR #9791).
K=/root/keep
for d in .whl .gguf-a .gguf-b .whl-bnb; do [ -d "$d" ] && mkdir -p "$K" && cp -r --update=none "$d" "$K/"; done
export PYTHONPATH=/root/extra/site-packages:$PWD HARNESS_CACHE=/root/hcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d "$K/.whl" ] && [ ! -f /root/extra/site-packages/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/extra/site-packages \
    "$K"/.whl/*.whl && touch /root/extra/site-packages/.installed
fi
if [ -d "$K/.whl-bnb" ] && [ ! -f /root/extra/site-packages/.bnb ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/extra/site-packages "$K"/.whl-bnb/*.whl \
    && touch /root/extra/site-packages/.bnb
fi
G=$HARNESS_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$G" ] && [ -f "$K/.gguf-a/part" ] && [ -f "$K/.gguf-b/part" ]; then
  mkdir -p "$(dirname "$G")" && cat "$K/.gguf-a/part" "$K/.gguf-b/part" > "$G"
fi
