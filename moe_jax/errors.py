"""Errors a user can cause. The CLI turns each into a one-line message and exit status 2."""

from __future__ import annotations


class MoeJaxError(Exception):
    """Base class: bad input from the user (never a bug in moe-jax).

    The message names the bad value and what would be valid.
    """


class ConfigError(MoeJaxError):
    """An unknown model preset or an inconsistent model configuration."""


class StrategyError(MoeJaxError):
    """A strategy that cannot be parsed, or one that does not fit the model, workload or devices."""


class ShardingError(MoeJaxError):
    """A logical axis name with no rule, or a dimension the mesh cannot split."""


def nearest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
