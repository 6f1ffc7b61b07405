"""RFC 3339 timestamps in one canonical form, so string order is time order."""

from __future__ import annotations

import datetime as dt
import re

UTC = dt.UTC


def format_ts(moment: dt.datetime) -> str:
    """`2026-11-28T14:09:55.123456Z`: UTC, always six fractional digits."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    m = moment.astimezone(UTC)
    # Not strftime: its %Y writes year 999 as "999", which sorts after "2026".
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T"
        f"{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}Z"
    )


def now_ts() -> str:
    return format_ts(dt.datetime.now(UTC))


# RFC 3339's date-time (section 5.6): a full date, 'T', a full time with
# seconds, any fraction, and an offset. Its ABNF is case-insensitive, so 't'
# and 'z' are the same letters. What ISO 8601 alone allows (week and ordinal
# dates, the basic format, no seconds, comma fractions, no offset) is not it.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2}(?:\.\d{1,30})?)(?:([Zz])|([+-]\d{2}:\d{2}))?",
    re.ASCII,
)


def parse_ts(text: str) -> dt.datetime:
    """Parse an RFC 3339 timestamp.

    Raises ValueError for anything that is not one, naming what is missing.
    """
    if not isinstance(text, str) or (m := _RFC3339.fullmatch(text)) is None:
        raise ValueError("not an RFC 3339 timestamp (YYYY-MM-DDTHH:MM:SS[.fraction] then 'Z' or '+HH:MM')")
    if not (m[3] or m[4]):
        # Matched but for the offset, which the regex leaves optional to say so.
        raise ValueError("not an RFC 3339 timestamp: it needs an offset ('Z' or '+HH:MM')")
    moment = dt.datetime.fromisoformat(f"{m[1]}T{m[2]}{'+00:00' if m[3] else m[4]}")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00:00+01:00 is a valid string whose UTC is year 0.
        raise ValueError("timestamp is outside years 1-9999 in UTC") from None


# UTC with up to six fractional digits: six is the canonical form itself,
# fewer (JavaScript's toISOString writes three) are only padded.
_UTC = re.compile(r"(\d{4}-[01]\d-[0-3]\dT[0-2]\d:[0-5]\d:[0-6]\d)(?:\.(\d{1,6}))?Z", re.ASCII)


def canonical_ts(text: str) -> str:
    # The agent already sends the canonical form: skip the reformatting, but
    # still parse, so an impossible date (month 13) is refused.
    if isinstance(text, str) and (utc := _UTC.fullmatch(text)) is not None:
        fraction = utc[2] or ""
        # Padded, the same instant in a string of the same order.
        canonical = text if len(fraction) == 6 else f"{utc[1]}.{fraction.ljust(6, '0')}Z"
        dt.datetime.fromisoformat(canonical)
        return canonical
    return format_ts(parse_ts(text))
