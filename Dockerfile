FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY sandbox ./sandbox
RUN pip install --no-cache-dir . && useradd --create-home vidq && mkdir -p /videos && chown vidq /videos
USER vidq
ENV VIDQ_STORAGE_URL=file:///videos
CMD ["celery", "-A", "worker", "worker", "-Q", "vidq.submit,vidq.poll,vidq.download", "-c", "8", "--loglevel", "INFO"]
