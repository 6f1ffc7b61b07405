"""Replace secrets with `***` before a line goes anywhere (hub, spool, mirrored output).

Every maximal run of characters covered by occurrences of secrets becomes one
`***`, so where secrets overlap no piece of any of them survives. The common
case, a line holding no secret, costs one regex search.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import AnyStr

MASK = "***"
MASK_BYTES = MASK.encode()
SECRET_NAME_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
MIN_ENV_SECRET_CHARS = 4


def _compile(alternation: AnyStr) -> tuple[re.Pattern[AnyStr], re.Pattern[AnyStr]]:
    """A plain alternation for the fast "any secret here?" test, and a lookahead
    one that reports, at every position where a secret starts, the longest one."""
    open_, close = ("(?=(", "))") if isinstance(alternation, str) else (b"(?=(", b"))")
    return re.compile(alternation), re.compile(open_ + alternation + close)  # type: ignore[operator]


def _intervals(finder: re.Pattern[AnyStr], data: AnyStr) -> list[list[int]]:
    """Start/end of every run of secret occurrences (overlapping or touching), in order."""
    merged: list[list[int]] = []
    for m in finder.finditer(data):
        start, end = m.start(), m.start() + len(m.group(1))
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _replace(
    data: AnyStr,
    intervals: list[list[int]],
    star: AnyStr,
    begin: int,
    end: int,
    continuing: bool = False,
) -> AnyStr:
    """`data[begin:end]` with the intervals masked. `continuing`: what was emitted
    before `begin` ended in a mask, which a run starting at `begin` extends."""
    out = []
    pos = begin
    for start, stop in intervals:
        if stop <= begin or start >= end:
            continue
        if start > pos:
            out.append(data[pos:start])
        if start > begin or (start == begin and not continuing):
            out.append(star)
        pos = stop
    out.append(data[pos:end])
    return data[:0].join(out)


def secrets_from_env(environ: Mapping[str, str]) -> list[str]:
    """Values (4+ characters) of variables whose name contains TOKEN, SECRET,
    PASSWORD or KEY. A multi-line value also contributes each of its lines,
    since output is masked line by line."""
    found: list[str] = []
    for name, value in environ.items():
        upper = name.upper()
        if not any(word in upper for word in SECRET_NAME_WORDS):
            continue
        candidates = [value, value.strip()]
        if "\n" in value:
            candidates += [line.strip() for line in value.splitlines()]
        found += [c for c in candidates if len(c) >= MIN_ENV_SECRET_CHARS]
    return found


class Masker:
    """Masks every occurrence of every secret in text or bytes."""

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = {s for s in secrets if s}
        # Longest first: the alternation then prefers the longest secret at a position.
        self.secrets: tuple[str, ...] = tuple(sorted(unique, key=lambda s: (-len(s), s)))
        self.secrets_bytes: tuple[bytes, ...] = tuple(
            sorted(
                {s.encode("utf-8", "surrogateescape") for s in self.secrets},
                key=lambda s: (-len(s), s),
            )
        )
        self.longest_bytes = len(self.secrets_bytes[0]) if self.secrets_bytes else 0
        if self.secrets:
            self._search, self._finder = _compile("|".join(map(re.escape, self.secrets)))
            self._search_b, self._finder_b = _compile(b"|".join(map(re.escape, self.secrets_bytes)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str], extra: Iterable[str] = ()) -> Masker:
        """Secrets from the environment plus the `--mask` values (empty ones ignored)."""
        return cls([*secrets_from_env(environ), *(v for v in extra if v)])

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def __repr__(self) -> str:  # never show the secrets themselves
        return f"Masker(<{len(self.secrets)} secrets>)"

    def mask(self, text: str) -> str:
        if not self.secrets or self._search.search(text) is None:
            return text
        return _replace(text, _intervals(self._finder, text), MASK, 0, len(text))

    def mask_bytes(self, data: bytes) -> bytes:
        if not self.secrets or self._search_b.search(data) is None:
            return data
        return _replace(data, _intervals(self._finder_b, data), MASK_BYTES, 0, len(data))

    def stream(self) -> StreamMasker:
        return StreamMasker(self)


def _open_prefix_start(data: bytes, secrets: tuple[bytes, ...]) -> int:
    """Start of the longest suffix of `data` that is a proper prefix of a secret
    (so could still become one), or len(data) when there is none."""
    start = len(data)
    for secret in secrets:
        first = secret[:1]
        i = data.find(first, max(0, len(data) - len(secret) + 1))
        while i != -1 and i < start:
            if secret.startswith(data[i:]):
                start = i
                break
            i = data.find(first, i + 1)
    return start


class StreamMasker:
    """Masks a byte stream that arrives in arbitrary chunks (a pipe's reads).

    `feed` returns at once everything that cannot become part of a secret and
    holds back only a tail that still could: a suffix that is a proper prefix
    of some secret. A short last line ("done\\n") before the command goes quiet
    is therefore never delayed. `flush` at EOF returns the rest. Concatenated
    over any chunking, the output equals `masker.mask_bytes(whole input)`,
    including a run of touching or overlapping secrets becoming one `***`
    across reads.
    """

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._keep = max(0, masker.longest_bytes - 1)
        self._held = b""
        # The last raw bytes already emitted: a secret starting there and still
        # going on must keep being masked (as part of the same ***).
        self._context = b""
        # The emitted output ends in a *** that a secret starting right after extends.
        self._ended_masked = False

    @property
    def held(self) -> int:
        return len(self._held)

    def feed(self, chunk: bytes) -> bytes:
        if not self.masker:
            return chunk
        return self._emit(self._held + chunk, final=False)

    def flush(self) -> bytes:
        if not self.masker:
            return b""
        out = self._emit(self._held, final=True)
        self._context = b""
        self._ended_masked = False
        return out

    def _emit(self, pending: bytes, final: bool) -> bytes:
        m = self.masker
        window = self._context + pending
        begin = len(self._context)
        cut = len(window) if final else _open_prefix_start(window, m.secrets_bytes)
        if m._search_b.search(window) is None:
            intervals: list[list[int]] = []
        else:
            intervals = _intervals(m._finder_b, window)
        end = cut
        for start, stop in intervals:
            # A run that starts before the cut is fully known (it cannot start
            # inside a possible prefix): emit all of it, masked.
            if start < cut < stop:
                end = max(end, stop)
        if end <= begin:
            self._held = pending
            return b""
        out = _replace(window, intervals, MASK_BYTES, begin, end, self._ended_masked)
        self._ended_masked = any(start < end <= stop for start, stop in intervals)
        self._context = window[max(0, end - self._keep) : end]
        self._held = window[end:]
        return out
