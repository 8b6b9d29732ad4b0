"""The toolkit's own errors: each one is a problem the user can fix, reported in one line.

Launchers catch `SetrError` and print `error: <message>` (exit 2) instead of a traceback; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SetrError(Exception):
    """Base of every error the toolkit reports to the user in one line."""
