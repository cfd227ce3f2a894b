"""What every command shares: help settings and turning library errors into one line."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click

from art_reat.errors import ArtReatError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def reports_errors(interrupted: str = "Interrupted.") -> Callable[[Callable], Callable]:
    """Errors the user can act on become `Error: ...` on stderr with exit 2 (usage) or 1 (runtime);
    Ctrl-C prints `interrupted` and exits 130."""

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except ArtReatError as exc:
                click.echo(f"Error: {exc}", err=True)
                sys.exit(exc.exit_code)
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)

        return wrapper

    return decorator


def comma_list(ctx, param, value: Optional[str]):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
