# The gateway image: gunicorn with uvicorn workers, every layer's driver, no build tools.
# Build: docker build -t channels-gateway .   Run: docker run -p 8000:8000 channels-gateway

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY layers layers
COPY app app
# Every dependency ships wheels for this Python, so this stage needs no compiler either; the final
# stage gets the virtualenv only, without pip.
RUN /opt/venv/bin/pip install --prefer-binary ".[all]" \
 && /opt/venv/bin/pip uninstall -y pip

FROM python:3.11-slim
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
# The image has no curl: ask /healthz with the Python that is there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8000'), timeout=2)"]
# gunicorn drains on SIGTERM: streams end at once with a reconnect hint (see app/shutdown.py).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "python:app.gunicorn_conf"]
