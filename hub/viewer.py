"""The web viewer: static files under hub/static/, served by the hub itself (no build step, no CDN)."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# One plain file name: no separators, no leading dot, so nothing outside static/ is reachable.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,100}")

# The page talks to its own hub only; a token it holds cannot be sent anywhere else,
# and no other site may frame it.
VIEWER_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def viewer_html() -> str:
    return (files("hub") / "static" / "viewer.html").read_text(encoding="utf-8")


@cache
def viewer_asset(name: str) -> tuple[bytes, str] | None:
    """A file of hub/static/ and its content type, or None."""
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    suffix = name[name.rfind("."):] if "." in name else ""
    content_type = _CONTENT_TYPES.get(suffix)
    if content_type is None:
        return None
    resource = files("hub") / "static" / name
    if not resource.is_file():
        return None
    return resource.read_bytes(), content_type
