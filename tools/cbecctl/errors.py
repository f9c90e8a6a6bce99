"""cbecctl's errors: each is reported to the SRE as one clear line with its exit status."""

from __future__ import annotations


class CbecctlError(Exception):
    """A failure to report to the SRE as one clear line (exit status 1)."""

    exit_code = 1


class Conflict(Exception):
    """The object changed between our read and our write (HTTP 409)."""


class RolloutFailed(CbecctlError):
    """A roll-out that did not complete in time or cannot progress (exit status 3)."""

    exit_code = 3
