#!/usr/bin/env bash
# Run lm-evaluation-harness's stock `local-completions` model against `leanlm serve` on a tiny local
# multiple-choice task (loglikelihood scoring). Run from anywhere; no network needed after setup.
# Setup once (never let pip touch torch):
#   python -m venv --system-site-packages /tmp/lmeval-venv
#   echo torch==2.13.0 > /tmp/lmeval-constraints.txt
#   /tmp/lmeval-venv/bin/pip install "lm-eval[api]" gguf -c /tmp/lmeval-constraints.txt
set -euo pipefail
cd "$(dirname "$0")/../.."                      # repository root (the task's data_files path is relative to it)
VENV=${LMEVAL_VENV:-/tmp/lmeval-venv}
PORT=${PORT:-8011}
TOK=${TOK:-/tmp/smollm2-135m-tokenizer}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# lm-eval needs a client-side tokenizer for loglikelihood (context lengths). The HF hub is unreachable,
# so export the tokenizer embedded in the cached GGUF to a local HF tokenizer dir (needs `gguf`).
if [ ! -f "$TOK/tokenizer.json" ]; then
  "$VENV/bin/python" -c "
from transformers import AutoTokenizer
import glob, os
g = glob.glob(os.path.expanduser('~/.cache/leanlm/models/smollm2-135m/*.gguf'))[0]
AutoTokenizer.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g)).save_pretrained('$TOK')"
fi

leanlm serve smollm2-135m --port "$PORT" --compile off > /tmp/leanlm-serve-$PORT.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done

time "$VENV/bin/lm_eval" --model local-completions \
  --model_args "model=smollm2-135m,base_url=http://127.0.0.1:$PORT/v1/completions,num_concurrent=1,max_retries=1,tokenized_requests=False,tokenizer_backend=huggingface,tokenizer=$TOK" \
  --tasks leanlm_tiny_mc --include_path bench/lm_eval --output_path /tmp/lmeval-out "$@"
