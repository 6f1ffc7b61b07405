"""The agent's own voice: one line per message on stderr, prefixed
`keruta-agent:`.

What the agent says is its command-line output to the person or CI log that
runs it (README, "A real session" shows it word for word), not a diagnostic
log: it has no levels, timestamps or logger names to configure, and a test
that wants to see it passes its own `say`. The hub, a service, uses
`logging`.
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    try:
        sys.stderr.write(f"keruta-agent: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
