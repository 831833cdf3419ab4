"""`python -m app`: serve the gateway with uvicorn."""

from __future__ import annotations

import uvicorn

from app.settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
