"""Errors of the fleet side; each names the thing at fault and the option that fixes it."""

from __future__ import annotations

from edge.errors import EdgeError


class FleetError(EdgeError):
    code = "fleet.error"


class BrokerError(FleetError):
    """The broker cannot be reached, refused the login, or refused a subscription."""

    code = "fleet.broker"


class SelectionError(FleetError):
    """An unknown device or tag, or no target at all."""

    code = "fleet.selection"


class StoreError(FleetError):
    """The event database cannot be opened, reached or written."""

    code = "fleet.store"
