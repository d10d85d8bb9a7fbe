# The service image: runtime dependencies only (onnxruntime, tokenizers, litestar, ...), no torch.
# The image carries no embedded teacher: the teacher runs as its own container (deploy/teacher/Dockerfile,
# or vLLM / any OpenAI-compatible server) reached by SENTIMENT_TEACHER_URL; without a URL fallback and
# explain answer 503 and /health/ready says why. Build from the repository root:
#   docker build -t sentiment-service:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY distill ./distill
COPY export ./export
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 sentiment
COPY --from=build /install /usr/local
WORKDIR /app
COPY models/sentiment-minilm-int8 ./models/sentiment-minilm-int8
COPY models/aspect-minilm-int8 ./models/aspect-minilm-int8
ENV SENTIMENT_HOST=0.0.0.0 \
    SENTIMENT_PORT=8000 \
    SENTIMENT_MODEL_DIR=/app/models/sentiment-minilm-int8 \
    SENTIMENT_ASPECT_MODEL_DIR=/app/models/aspect-minilm-int8 \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)"]
CMD ["python", "-m", "service"]
