"""The ``moe-jax`` command line: parse the options, call the library, hand the result to `moe_jax.reporting`.

app        the `cli` group, its console and `main` (errors → one message, exit status 2)
options    the options commands share: workload, outputs, compiler, dispatch, cluster
outputs    output paths checked before the work, JSON / HLO / .npy written atomically after it
listing    models, hardware, describe: presets and placement, nothing compiled
running    verify, run: the sharded model on devices
predict    analyze, plan: compile, read the cost, predict

Importing this module registers every command on `cli`.
"""

from __future__ import annotations

from moe_jax.cli import calibrate, listing, predict, running  # noqa: F401  (each registers its commands on `cli`)
from moe_jax.cli.app import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    main()
