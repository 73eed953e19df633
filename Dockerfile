# syntax=docker/dockerfile:1
#
# One image for every Mesh process (distribution `meshkit`):
#
#   docker run IMAGE                                 a node (CMD: meshkit-node; flags or MESH_* env)
#   docker run IMAGE meshkit-node --listen ...       a node with flags
#   docker run IMAGE meshkit-coordinator --listen ...  a coordinator
#   docker run --rm IMAGE meshctl status             the operator CLI
#
# There is no ENTRYPOINT: the command is the program (meshkit-node,
# meshkit-coordinator or meshctl) followed by its flags, exactly those of
# `python -m nodes --help` / `python -m coordinator --help` / `meshctl --help`;
# every flag also reads a MESH_* variable. Ports: 7000 node client port
# (--listen), 7001 node peer port (--peer-listen), 7400 coordinator admin port,
# 9100 /metrics (--metrics-listen). The node's data dir (--data-dir, MESH_DATA_DIR)
# is the volume /var/lib/mesh. The HEALTHCHECK asks the gRPC health service of a
# node on 127.0.0.1:7000 (`meshctl health`); a coordinator's container overrides
# it with 127.0.0.1:7400 (see compose.yaml).
#
# Build: docker build -t meshkit:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim

# ---- stage 1: the wheel, with the commands of `make dist` --------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only `build`: it installs pyproject.toml's build requirements (setuptools,
# grpcio-tools, mypy-protobuf) into an isolated environment, where setup.py
# generates the protobuf code from protos/ (no tools/generate.py step, no
# generated/ in the context). The sdist first, then the wheel from it, as `make dist`.
RUN python -m pip install --upgrade pip build
COPY . .
RUN python -m build --outdir dist .

# ---- stage 2: meshkit[server] from the wheel, as a non-root user ------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="meshkit" \
      org.opencontainers.image.description="Mesh: a gRPC service mesh (nodes, coordinators, meshctl)"
# GRPC_EXPERIMENTS: gRPC's sockets served by its poller, not EventEngine threads
# (less CPU per message; see common/grpc_engine.py).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MESH_DATA_DIR=/var/lib/mesh \
    GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener
RUN groupadd --system --gid 10001 mesh \
 && useradd --system --uid 10001 --gid mesh --home-dir /var/lib/mesh --no-create-home \
            --shell /usr/sbin/nologin mesh \
 && mkdir -p /var/lib/mesh && chown mesh:mesh /var/lib/mesh && chmod 0750 /var/lib/mesh
COPY --from=build /src/dist/ /tmp/dist/
# At the versions the checkout tests (constraints.txt, written by `make lock`).
COPY constraints.txt /tmp/dist/
RUN python -m pip install --constraint /tmp/dist/constraints.txt \
        "$(ls /tmp/dist/meshkit-*-py3-none-any.whl)[server]" \
 && rm -rf /tmp/dist
USER 10001:10001
WORKDIR /var/lib/mesh
VOLUME ["/var/lib/mesh"]
EXPOSE 7000 7001 7400 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["meshctl", "--timeout", "2", "health", "127.0.0.1:7000"]
CMD ["meshkit-node"]
