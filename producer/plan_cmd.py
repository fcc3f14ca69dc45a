"""`vidq plan FILE`: the capacity plan (producer/plan.py) without enqueuing."""
from __future__ import annotations

import click

from .cli import (
    VidqCommand,
    _deadline_option,
    _prompt_defaults,
    _prompt_options,
    cli_settings,
    main,
)
from .plan import plan_file


@main.command(cls=VidqCommand)
@_prompt_options
@_deadline_option
def plan(file, model, resolution, aspect_ratio, negative_prompt, seed, no_enhance_prompt,
         deadline):
    """Print what FILE's prompts would take at this deployment's C; enqueue nothing."""
    defaults = _prompt_defaults(model, resolution, aspect_ratio, negative_prompt, seed,
                                no_enhance_prompt)
    for line in plan_file(cli_settings(), file, defaults, deadline):
        click.echo(line)
