# The vidq image: workers, Flower, the producer CLI and the sandbox.
# No secret is baked in: AIMLAPI_KEY, the Redis password and the S3
# credentials come from the environment at run time (compose .env, k8s Secrets).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY sandbox ./sandbox
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it. /videos is for
# VIDQ_STORAGE_URL=file:///videos, /data for Flower's persistent state, /journal
# for paid generation ids a worker holds until Redis has them (VIDQ_JOURNAL_DIR).
RUN pip install --no-cache-dir . \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin vidq \
 && mkdir -p /videos /data /journal \
 && chown vidq:vidq /videos /data /journal
USER 10001
ENV VIDQ_STORAGE_URL=file:///videos VIDQ_JOURNAL_DIR=/journal
# Stopping it is a warm shutdown that may wait out a POST (SIGTERM): give it
# `docker run --stop-timeout 135` (compose and the manifests in deploy/ do);
# Docker's default 10 s kills a pool child holding a paid id.
CMD ["celery", "-A", "worker", "worker", "-Q", "vidq.submit,vidq.poll,vidq.download,vidq.webhook", "-c", "8", "--loglevel", "INFO"]
