"""Commands that read the presets and a strategy's placement; nothing is compiled: models, hardware, describe."""

from __future__ import annotations

import click

from moe_jax.cli.app import cli, out
from moe_jax.cli.options import SEED_WORKLOAD, json_flag, model_option, positive, strategy_option, workload_options
from moe_jax.config import get_model, preset_names
from moe_jax.files import dumps
from moe_jax.parallel.mesh import Strategy
from moe_jax.reporting import tables


@cli.command()
@json_flag("Print a JSON list instead of a table.")
def models(as_json):
    """List the model presets with their parameter counts (computed from each config)."""
    cfgs = [get_model(n) for n in preset_names()]
    if as_json:
        click.echo(dumps([c.summary() for c in cfgs], indent=2))
        return
    tables.print_models(out, cfgs)


@cli.command("hardware")
@json_flag()
def hardware_cmd(as_json):
    """List the hardware presets with their figures and sources."""
    from moe_jax.hardware.presets import get_hardware, hardware_names

    hws = [get_hardware(n) for n in hardware_names()]
    if as_json:
        click.echo(dumps([h.to_dict() for h in hws], indent=2))
        return
    tables.print_hardware(out, hws)


@cli.command()
@model_option
@strategy_option()
@click.option("--devices", type=int, callback=positive, help="Device count the strategy must use.")
@workload_options(SEED_WORKLOAD, explained=True)
@json_flag("Print JSON instead of tables.")
def describe(model_name, strategy_spec, devices, batch, prompt_len, gen_len, as_json):
    """Validate a strategy for a model and show exactly what each device holds."""
    from moe_jax.parallel.mesh import validate
    from moe_jax.programs.placement import describe as describe_placement
    from moe_jax.reporting.architecture import architecture_dict

    cfg = get_model(model_name)
    strategy = Strategy.load(strategy_spec)
    validate(strategy, cfg, batch=batch, num_devices=devices)
    placement = describe_placement(cfg, strategy, batch=batch, cache_len=prompt_len + gen_len,
                                   prompt_len=prompt_len)
    if as_json:
        data = placement.to_dict()
        data["workload"] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
        data["architecture"] = architecture_dict(cfg)
        click.echo(dumps(data, indent=2))
        return
    tables.print_placement(out, placement, prompt_len, gen_len)
