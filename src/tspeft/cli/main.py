"""The `tspeft` command: parse (parser.py), then run the subcommand (commands.py, compare.py).

    tspeft --help       the subcommands and examples (parser.USAGE)
"""

from __future__ import annotations

import os
import sys

from .commands import cmd_eval, cmd_importance, cmd_report, cmd_setup, cmd_train
from .compare import cmd_compare
from .parser import parse

COMMANDS = {"setup": cmd_setup, "train": cmd_train, "eval": cmd_eval, "compare": cmd_compare,
            "importance": cmd_importance, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        # bad data, a bad run folder, too few examples, ...: one clear line instead of a traceback
        if os.environ.get("TSPEFT_DEBUG"):
            raise
        parser._tspeft_sub[args.command].exit(2, f"tspeft {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
