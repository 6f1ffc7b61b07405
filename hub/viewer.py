"""The web viewer: one static page that lists tasks and follows one live."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def viewer_html() -> str:
    return (files("hub") / "static" / "viewer.html").read_text(encoding="utf-8")
