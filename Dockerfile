# The image the cluster configs run (cluster/rayservice.yaml, cluster/ray-cluster.yaml): Ray's
# image of the version the project is tested with (ray[serve] 2.60.0, Python 3.11), with this
# project installed into it, so that `deployments.app:build_app` imports on every node.
#
# For the cluster configs, from the repository root (their GPU scorers need torch's CUDA build;
# pick the CUDA index your nodes' driver supports):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t ghcr.io/my-shop/rerank:0.1.0 .
#   docker push ghcr.io/my-shop/rerank:0.1.0
# CPU only (the default: torch's CPU wheel, a much smaller image):
#   docker build -t rerank:0.1.0-cpu .
# Replace ghcr.io/my-shop with your registry in both cluster configs too
# (tests/test_cluster_configs.py checks that they name the image built here).
#
# No secrets in the image: Ray's token, the API keys and the Redis URL come at run time from
# Kubernetes Secrets (cluster/rayservice.yaml) or the launcher's secrets files
# (cluster/ray-cluster.yaml). It runs as the base image's non-root user `ray`.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="rerank" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Real-time re-ranking on Ray Serve"

# The base image's user `ray` (uid 1000, group users 100), by number so that Kubernetes'
# runAsNonRoot can check it.
USER 1000:100
WORKDIR /home/ray/rerank

# torch first, from the chosen index (CPU or CUDA); the project's own install then keeps it.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 rerank ./rerank
COPY --chown=1000:100 deployments ./deployments
# ray[serve] pinned to the base image's Ray, so that pip never swaps Ray under the image.
RUN pip install --no-cache-dir . "ray[serve]==${RAY_VERSION}" "torch==${TORCH_VERSION}"
