"""gunicorn configuration for production: `gunicorn -c app/gunicorn_conf.py`.

Every value comes from the gateway settings (`GATEWAY_*` environment variables), so the container,
the Helm chart and `python -m app` read one set of variables. gunicorn's own command-line flags
still win over this file; `on_starting` re-checks the worker count they give.

- Workers are `uvicorn-worker` workers on uvloop and httptools (`app.server`'s protocol: a header
  timeout and a socket ceiling per worker), each running the whole app with
  its own channel listener: `GATEWAY_WORKERS` > 1 needs a cross-process layer, and start-up stops
  with a message naming them when the layer is `memory://`.
- Streams are long-lived: a worker is never recycled by request count, and the heartbeat
  `timeout` does not limit a request's duration under uvicorn workers (the event loop notifies).
- SIGTERM drains (see `app.shutdown`): each worker ends its streams at once, then waits up to
  `GATEWAY_SHUTDOWN_GRACE_SECONDS` for requests in flight; gunicorn's `graceful_timeout` is a
  little longer, so a worker is only killed if its own drain hangs.
- Metrics: every worker writes its values under `PROMETHEUS_MULTIPROC_DIR` (a fresh temporary
  directory unless set) and `/metrics` adds them up; the files of a worker that exits are marked
  dead so its gauges stop counting.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from uvicorn_worker import UvicornWorker

from app.logs import log_config
from app.server import ws_max_size
from app.settings import settings_or_exit

settings = settings_or_exit()  # memory:// with GATEWAY_WORKERS > 1 stops here, saying why
drain_seconds = math.ceil(settings.shutdown_grace_seconds)

own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ


class GatewayWorker(UvicornWorker):  # type: ignore[misc]  # untyped base
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "uvloop",
        "http": "app.server:GatewayHttpProtocol",  # httptools, with a header timeout and a ceiling
        "ws_max_size": ws_max_size(settings),
        "timeout_graceful_shutdown": drain_seconds,
        "access_log": settings.access_log,
    }


wsgi_app = "app.main:app"  # imported in each worker (not preloaded): settings are read there
bind = [f"{settings.host}:{settings.port}"]
workers = settings.workers
worker_class = GatewayWorker
graceful_timeout = drain_seconds + 5
timeout = 30
keepalive = 5
max_requests = 0
control_socket_disable = True  # no runtime control socket: containers are managed from outside
logconfig_dict = log_config(settings.log_level, settings.log_format, access_log=settings.access_log)
accesslog = "-" if settings.access_log else None


def on_starting(server: Any) -> None:
    """Check the worker count gunicorn will really run, and start metrics from zero."""
    settings_or_exit(workers=server.cfg.workers)
    # Set before the workers fork and import prometheus_client, which reads it once at import
    # (the app is not preloaded into this process).
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()


def post_worker_init(worker: Any) -> None:
    from app.__main__ import tune_gc

    tune_gc()


def on_exit(server: Any) -> None:
    if own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
