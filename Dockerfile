# syntax=docker/dockerfile:1
# The RLHF operator image: the kopf operator and the torch-free base of rlhf-trainer (the shared
# TrainerConfig definition and the metrics contract). No torch, no compilers.
# Build from the repository root:
#   docker build -t ghcr.io/rlhf-platform/rlhf-operator:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The openssl CLI: without a mounted certificate the operator generates the webhook's self-signed one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssl \
 && rm -rf /var/lib/apt/lists/*

# Third-party dependencies, exactly as pinned (their own layer: it changes only with the pins).
COPY requirements/operator.txt /src/requirements/operator.txt
RUN pip install -r /src/requirements/operator.txt

# The two project packages without dependencies (all are pinned above); pip check proves nothing is
# missing, the import proves the operator loads without torch.
COPY trainer_image/pyproject.toml /src/trainer_image/pyproject.toml
COPY trainer_image/rlhf_trainer /src/trainer_image/rlhf_trainer
COPY operator/pyproject.toml /src/operator/pyproject.toml
COPY operator/rlhf_operator /src/operator/rlhf_operator
RUN pip install --no-deps /src/trainer_image /src/operator \
 && pip check \
 && python -c "import rlhf_operator, rlhf_trainer.config, rlhf_trainer.contract" \
 && rm -rf /src

# A numeric non-root user, so that the kubelet can verify runAsNonRoot.
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin rlhf
USER 10001:10001
WORKDIR /tmp

# 8080: Prometheus metrics (RLHF_METRICS_PORT); 8081: kopf /healthz (RLHF_HEALTH_PORT);
# 9443: admission webhook (RLHF_WEBHOOK_PORT).
EXPOSE 8080 8081 9443
ENTRYPOINT ["python", "-m", "rlhf_operator"]
