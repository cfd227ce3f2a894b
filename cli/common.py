"""What every command shares: help settings and turning library errors into one line."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click

from art_reat.errors import ArtReatError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def reports_errors(interrupted: str = "Interrupted.") -> Callable[[Callable], Callable]:
    """Errors the user can act on become `Error: ...` on stderr with exit 2 (usage) or 1 (runtime)
    (`Interrupted: ...` and 130 / 143 for a training stopped by SIGINT / SIGTERM);
    a bare Ctrl-C prints `interrupted` and exits 130."""

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except ArtReatError as exc:
                click.echo(f"{getattr(exc, 'prefix', 'Error')}: {exc}", err=True)
                sys.exit(exc.exit_code)
            except KeyboardInterrupt as exc:
                if getattr(exc, "exit_code", None) is not None and str(exc):  # TrainingInterrupted: says it all
                    click.echo(f"{getattr(exc, 'prefix', 'Interrupted')}: {exc}", err=True)
                    sys.exit(exc.exit_code)
                click.echo(interrupted, err=True)
                sys.exit(130)

        return wrapper

    return decorator


def comma_list(ctx, param, value: Optional[str]):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
