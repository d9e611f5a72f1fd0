"""`python -m moe_jax.cli`."""

from moe_jax.cli.commands import main

main()
