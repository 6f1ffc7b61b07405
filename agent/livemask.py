"""Mask secrets in a byte stream without holding back more than necessary.

`keruta.masking.StreamMasker` always holds the last `longest secret - 1`
bytes of every read until the next read: a short line ("done\\n") printed
before the command goes quiet would then wait, unsent and unmirrored, for as
long as the command stays quiet. Here only bytes that could still become a
secret are held: a tail of the data that is a proper prefix of some secret
(and any occurrence straddling the cut). Everything else goes out at once,
masked with `Masker.mask_bytes`.

The agent masks each pipe's raw bytes once, here, and both the mirrored
output and the line splitter (hence spool and hub) get the same masked bytes.
"""

from __future__ import annotations

from keruta.masking import Masker


def _open_prefix_start(data: bytes, secrets: tuple[bytes, ...]) -> int:
    """Start of the longest suffix of `data` that is a proper prefix of a secret,
    or len(data) when there is none."""
    start = len(data)
    for secret in secrets:
        first = secret[:1]
        lo = max(0, len(data) - len(secret) + 1)
        i = data.find(first, lo)
        while i != -1 and i < start:
            if secret.startswith(data[i:]):
                start = i
                break
            i = data.find(first, i + 1)
    return start


def _safe_cut(data: bytes, cut: int, secrets: tuple[bytes, ...]) -> int:
    """Move `cut` left until no occurrence of a secret straddles it."""
    moved = True
    while moved and cut > 0:
        moved = False
        for secret in secrets:
            i = data.find(secret, max(0, cut - len(secret) + 1))
            if i != -1 and i < cut < i + len(secret):
                cut = i
                moved = True
    return cut


class LiveMasker:
    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._secrets = masker.secrets_bytes
        self._held = b""

    @property
    def held(self) -> int:
        return len(self._held)

    def feed(self, chunk: bytes) -> bytes:
        if not self.masker:
            return chunk
        data = self._held + chunk if self._held else chunk
        cut = _safe_cut(data, _open_prefix_start(data, self._secrets), self._secrets)
        self._held = data[cut:]
        return self.masker.mask_bytes(data[:cut]) if cut else b""

    def flush(self) -> bytes:
        data, self._held = self._held, b""
        return self.masker.mask_bytes(data) if data else b""
