"""The ``moe-jax`` group, its console and its entry point; the commands register themselves on `cli`.

Every error a user can cause exits with status 2 and one message naming the bad value;
no traceback. jax is imported only inside commands that need it, after the fake CPU
device count is set.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

from moe_jax.compat import quiet_plugin_errors
from moe_jax.errors import MoeJaxError

# Tables keep their columns when printed to a file or a pipe (rich would otherwise assume 80).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moe-jax")
def cli():
    """moe-jax: find and prove the parallel strategy (ep, tp, pp, dp) for serving a MoE model."""


def main(argv=None) -> None:
    """Console-script entry point: user errors → message on stderr, exit status 2."""
    quiet_plugin_errors()
    try:
        cli.main(args=argv, prog_name="moe-jax", standalone_mode=False, obj={"argv": argv})
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except MoeJaxError as e:
        click.echo(f"moe-jax: error: {e}", err=True)
        sys.exit(getattr(e, "exit_status", 2))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
