"""The ``lorakit`` command's entry point: Ctrl-C at any moment — even while the command line and
torch are still being imported — ends with one line and exit status 130, never a traceback."""

from __future__ import annotations

import signal
import sys

from .interrupts import outside_imports

INTERRUPTED = "lorakit: error: interrupted; nothing was written\n"


def _interrupt(signum: int) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGINT, outside_imports(_interrupt))
    try:
        import click

        from .cli import main as cli

        try:
            code = cli.main(args=sys.argv[1:], prog_name="lorakit", standalone_mode=False)
        except click.exceptions.Abort:  # click's wrapper of a Ctrl-C inside a command
            raise KeyboardInterrupt from None
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED)
        sys.exit(130)
