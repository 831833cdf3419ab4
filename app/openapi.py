"""`python -m app.openapi`: export the OpenAPI document to `openapi/openapi.json`.

The exported file is checked against the app by the tests, so it never drifts from the routes.
"""

from __future__ import annotations

import sys

import orjson

from app.main import create_app
from app.settings import Settings


def export() -> bytes:
    """The document of an app with default settings, as the committed file holds it."""
    app = create_app(Settings.model_construct())  # defaults only: the environment must not leak
    return orjson.dumps(app.openapi(), option=orjson.OPT_INDENT_2) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(export())
