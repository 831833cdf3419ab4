"""`python -m app`: serve the gateway with uvicorn."""

from __future__ import annotations

import math

import uvicorn

from app.logs import log_config
from app.settings import settings_or_exit


def main() -> None:
    settings = settings_or_exit()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds),
        access_log=settings.access_log,
        log_config=log_config(
            settings.log_level, settings.log_format, access_log=settings.access_log
        ),
    )


if __name__ == "__main__":
    main()
