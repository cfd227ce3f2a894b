"""What every command shares: help settings and turning library errors into one line."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click

from art_reat.errors import ArtReatError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def reports_errors(func: Callable) -> Callable:
    """Errors the user can act on become `Error: ...` on stderr with exit 2 (usage) or 1 (runtime)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ArtReatError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted: the MLflow run was marked KILLED.", err=True)
            sys.exit(130)

    return wrapper


def comma_list(ctx, param, value: Optional[str]):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
