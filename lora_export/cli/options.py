"""What the commands of ``lora-train`` and ``lora-export`` share: error handling (``exit_on_error``), the
``--data PATH...`` option, ``--force`` and ``-h``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import EXIT_BAD_INPUT, INTERRUPTED_EXIT, TERMINATED_EXIT, Terminated, first_line

CommandT = TypeVar("CommandT", bound=Callable[..., Any])

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}



def exit_on_error(command: CommandT) -> CommandT:
    """Decorate a click command: a LoraExportError (any ValueError) or OSError becomes 'error: ...' + exit 2; an
    interrupt becomes 'error: interrupted' + exit 130 (click's own would print 'Aborted!' and exit 1).

    click's own usage errors (unknown option, bad choice) are left to click, which also exits with 2.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Terminated:
            click.echo("error: terminated", err=True)
            raise SystemExit(TERMINATED_EXIT) from None
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            raise SystemExit(INTERRUPTED_EXIT) from None
        except (ValueError, OSError) as err:
            if isinstance(err, OSError) and err.filename is not None:
                message = f"{err.filename}: {err.strerror or err}"
            else:
                message = first_line(err)
            click.echo(f"error: {message}", err=True)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


FORCE_HELP = "Replace outputs that exist already (without it, an existing output is an error)."


class PathsOption(click.Option):
    """A repeatable path option that also takes several paths after one flag, like argparse's ``nargs="+"``:
    ``--data a.txt dir/ b.txt`` is ``--data a.txt --data dir/ --data b.txt`` (so a shell glob works). The paths end
    at the next option or ``--``; a positional argument right after them would be read as one more path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, multiple=True, type=click.Path(path_type=Path), metavar="PATH...", **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        # click has no variadic option (nargs=-1 is for arguments only): after the flag's own value, its parser
        # entry also takes every following argument that is not an option.
        entry = parser._long_opt.get(self.opts[0]) or parser._short_opt[self.opts[0]]
        take_one = entry.process

        def take_all(value: Any, state: Any) -> None:
            take_one(value, state)
            while state.rargs and not (state.rargs[0].startswith("-") and len(state.rargs[0]) > 1):
                take_one(state.rargs.pop(0), state)

        entry.process = take_all


def memory_check_option(command: CommandT) -> CommandT:
    """``--no-memory-check``: go ahead even when the estimated peak memory is above what this process may use."""
    return click.option("--no-memory-check", is_flag=True,
                        help="Go ahead even when the estimated peak memory is above what this process may use "
                             "(cgroup limit or MemAvailable); without it such a run is refused before any work, "
                             "naming both figures and the options that would fit.")(command)


def data_option(help_text: str) -> Callable[[CommandT], CommandT]:
    """``--data PATH...``: text files or directories, several after one flag or the flag repeated."""
    return click.option("--data", cls=PathsOption, help=help_text)
