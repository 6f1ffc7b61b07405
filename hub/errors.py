"""An error answer: what a check anywhere in the hub raises, and
hub/routes/hooks.py (or the ASGI layers) turns into `{"error", "message"}`."""

from __future__ import annotations


class ApiError(Exception):
    """An answer `{"error": code, "message": ...}` with this status (hub/routes/hooks.py)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
