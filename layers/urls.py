"""Layer URLs as they may be shown: in errors, logs, replies. Secrets never are.

`redact` is the one function that prints a layer URL. It masks the password of the user-info and
the value of every query option that holds a secret (a password, a token, a private key or its
path), whatever the layer, so a URL may go into an error detail or a log line as it is.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

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
