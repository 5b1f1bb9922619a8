"""The `tspeft` command: parse (parser.py), then run the subcommand (commands.py, compare.py).

    tspeft --help       the subcommands and examples (parser.USAGE)

Every failure ends as one line `tspeft CMD: error: ...` (run_command): exit 2 for bad input, files, run
folders and the machine (USER_ERRORS), 1 for anything else (a bug), 130 for Ctrl-C. `tspeft --debug ...`
(or $TSPEFT_DEBUG) prints the traceback first.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from safetensors import SafetensorError

from .commands import cmd_eval, cmd_generate, cmd_importance, cmd_report, cmd_setup, cmd_train
from .compare import cmd_compare
from .parser import parse

COMMANDS = {"setup": cmd_setup, "train": cmd_train, "eval": cmd_eval, "compare": cmd_compare,
            "importance": cmd_importance, "generate": cmd_generate, "report": cmd_report}
# Failures caused by the user's input, files or machine (exit 2); any other exception is a bug (exit 1).
USER_ERRORS = (ValueError, OSError, UnicodeError, SafetensorError)


def describe_error(error: BaseException) -> str:
    """One line for a failure: an OS error as 'path: reason', anything else by its message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        other = f" -> {error.filename2}" if error.filename2 else ""
        return f"{where}{error.strerror}{other}"
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, USER_ERRORS):
        return text
    return f"unexpected {type(error).__name__}: {text} (--debug shows where)"


def run_command(command: str, args: argparse.Namespace, debug: bool) -> int:
    """Run one subcommand; a failure becomes one line on stderr and an exit code (see the module docstring)."""
    try:
        return COMMANDS[command](args)
    except KeyboardInterrupt:
        print(f"tspeft {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns failures into one line
        if debug:
            traceback.print_exc()
        print(f"tspeft {command}: error: {describe_error(error)}", file=sys.stderr)
        return 2 if isinstance(error, USER_ERRORS) else 1


def main(argv: list[str] | None = None) -> int:
    _, args = parse(argv)
    code = run_command(args.command, args, debug=args.debug or bool(os.environ.get("TSPEFT_DEBUG")))
    if code:
        sys.exit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
