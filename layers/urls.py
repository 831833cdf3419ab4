"""Layer URLs: their options, and how they may be shown (in errors, logs, replies).

`redact` is the one function that prints a layer URL. It masks the password of the user-info and
the value of every query option that holds a secret (a password, a token, a private key or its
path), whatever the layer, so a URL may go into an error detail or a log line as it is.

`split_options` is the one policy for URL options: a layer takes its own options out of the
query and leaves its driver's in; any other option is refused, naming the known ones, so a typo
is an error at start-up rather than a setting silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .errors import LayerConfigurationError

MASK = "***"
# Option names that hold a secret: passwords, tokens, private keys (or their files).
_SECRET_OPTION = re.compile(
    r"pass|pwd|secret|token|credential|(^|[^a-z])auth|key$|key_?file|key_?path", re.IGNORECASE
)

# Schemes whose user-info without a colon is a token, not a user name (nats://<token>@host).
_TOKEN_USERINFO = frozenset({"nats", "tls"})


def is_secret_option(name: str) -> bool:
    return _SECRET_OPTION.search(name) is not None


def redact(url: str) -> str:
    """`url` with the user-info password and secret query options replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: show its scheme at most
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://{MASK}" if sep else MASK
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{hostport}"
        elif parts.scheme.split("+")[0] in _TOKEN_USERINFO:
            netloc = f"{MASK}@{hostport}"
    query = "&".join(
        f"{field.partition('=')[0]}={MASK}"
        if is_secret_option(unquote(field.partition("=")[0]))
        else field
        for field in parts.query.split("&")
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def split_options(
    url: str, ours: Collection[str], *, driver: Collection[str] | None = ()
) -> tuple[str, dict[str, str]]:
    """The URL without the layer's own query options, and those options (the last of each).

    `driver` lists the options the URL may carry for the layer's driver, which stay in the URL;
    `None` passes on whatever is left, for a driver that refuses unknown options itself (asyncpg
    hands them to PostgreSQL as settings, and the server refuses one it does not know).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if driver is not None:
        unknown = sorted({key for key, _ in query} - set(ours) - set(driver))
        if unknown:
            known = ", ".join([*ours, *driver])
            raise LayerConfigurationError(
                f"unknown {parts.scheme}:// URL option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}; use {known}"
            )
    own = {key: value for key, value in query if key in ours}
    rest = [(key, value) for key, value in query if key not in ours]
    return urlunsplit(parts._replace(query=urlencode(rest))), own
