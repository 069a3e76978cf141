"""Errors of rollouts; each carries a stable code the fleet sees in ``rollout.done`` events."""

from __future__ import annotations

from edge.errors import EdgeError


class RolloutError(EdgeError):
    code = "rollout.error"


class RolloutStopped(RolloutError):
    """The daemon is stopping: the rollout's download or wait ends here (nothing was switched)."""

    code = "rollout.stopped"
