# lrmerge's router (lrmerge_hub/serve/gate.py): the API key on every route, then each request to the
# vLLM that serves its `model`. It needs only aiohttp. Built from the repository root:
#   docker build -f serving/router.Dockerfile -t lrmerge-router .
# In Kubernetes it runs beside vLLM in the pod (serving/k8s/): the only port the Service reaches.
FROM python:3.11-slim
RUN pip install --no-cache-dir "aiohttp==3.14.5"
COPY lrmerge_hub/__init__.py /opt/lrmerge/lrmerge_hub/
COPY lrmerge_hub/serve/__init__.py lrmerge_hub/serve/gate.py /opt/lrmerge/lrmerge_hub/serve/
ENV PYTHONPATH=/opt/lrmerge
# Not root; --no-key is refused on any bind but loopback, so this image always wants VLLM_API_KEY.
RUN useradd --uid 10001 --user-group --no-create-home lrmerge
USER 10001
ENTRYPOINT ["python3", "-m", "lrmerge_hub.serve.gate"]
