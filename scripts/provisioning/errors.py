"""The two ways provisioning stops: a usage error (before any host) and a host's failure."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in the command line or the inventory: one line, exit 2."""


class HostFailure(Exception):
    """This host cannot go on; the message is what the summary shows."""
