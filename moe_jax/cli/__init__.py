"""The `moe-jax` command line."""

from moe_jax.cli.commands import cli, main

__all__ = ["cli", "main"]
