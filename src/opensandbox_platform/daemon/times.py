"""RFC 3339 timestamps in UTC (`2026-11-30T04:29:19Z`), written and read the same way everywhere.

Seconds are what Kubernetes' `metav1.Time` and our CRD fields carry; six digits are
`metav1.MicroTime` (Events, Leases) and what the server's records keep; execd and the task
executor report milliseconds, as upstream's execd does.
"""

from __future__ import annotations

import datetime as dt

UTC = dt.UTC


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def from_ns(ns: int) -> dt.datetime:
    """A datetime from nanoseconds since the epoch (a stat's st_mtime_ns), exact to the microsecond."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return dt.datetime.fromtimestamp(seconds, UTC).replace(microsecond=fraction // 1000)


def rfc3339(at: dt.datetime | float | None = None, *, digits: int = 0) -> str:
    """`at` (a datetime, seconds since the epoch, default now) in UTC with a `Z`, with `digits`
    (0, 3 or 6) fractional digits, truncated."""
    if at is None:
        at = now()
    elif not isinstance(at, dt.datetime):
        at = dt.datetime.fromtimestamp(at, UTC)
    text = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{at.microsecond:06d}"[:digits]
    return text + "Z"


def parse(value: str) -> dt.datetime:
    """An aware datetime from RFC 3339 (`Z` or an offset; a naive time is taken as UTC).

    ValueError for anything else."""
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_optional(value: str | None) -> dt.datetime | None:
    """`parse`, with None or "" for a field that is not set."""
    return parse(value) if value else None
