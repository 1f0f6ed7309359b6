# lrmerge's router (lrmerge_hub/gate.py): the API key on every route, then each request to the
# vLLM that serves its `model`. It needs only aiohttp. Built from the repository root:
#   docker build -f serving/router.Dockerfile -t lrmerge-router .
FROM python:3.11-slim
RUN pip install --no-cache-dir "aiohttp==3.14.5"
COPY lrmerge_hub/__init__.py lrmerge_hub/gate.py /opt/lrmerge/lrmerge_hub/
ENV PYTHONPATH=/opt/lrmerge
ENTRYPOINT ["python3", "-m", "lrmerge_hub.gate"]
