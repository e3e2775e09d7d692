"""Secrets out of logs and error bodies: URL passwords and named secrets masked."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/\s]*):(?P<password>[^/\s]*)@")
_QUERY_PASSWORD = re.compile(r"(?P<name>[?&](?:password|pass|pwd)=)[^&#\s]*", re.IGNORECASE)


def safe_url(url: str) -> str:
    """`url` with its password masked: redis://:secret@host:6379/0 -> redis://:***@host:6379/0,
    redis://user:secret@host -> redis://user:***@host, ?password=secret -> ?password=***.
    URLs without a password are returned unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostport}"
    query = _QUERY_PASSWORD.sub(lambda m: f"{m['name']}{MASK}", f"?{parts.query}")[1:]
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every URL password masked (as in safe_url) and every non-empty string of
    `secrets` replaced by ***, for error messages and logs."""
    out = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(text))
    out = _QUERY_PASSWORD.sub(lambda m: f"{m['name']}{MASK}", out)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):  # longest first
        out = out.replace(secret, MASK)
    return out
