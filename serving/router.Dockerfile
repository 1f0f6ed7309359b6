# LiteLLM's proxy, pinned. It needs huggingface_hub < 2, so it never shares an image or a
# virtual environment with lrmerge-hub.
FROM python:3.11-slim
RUN pip install --no-cache-dir "litellm[proxy]==1.108.7"
ENV LITELLM_LOCAL_MODEL_COST_MAP="True" LITELLM_TELEMETRY="False"
ENTRYPOINT ["litellm"]
