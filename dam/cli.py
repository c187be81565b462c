"""The ``dam`` command line: thin subcommands over the library.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets ``func``.
User errors (:class:`dam.errors.DamError`) print one line and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dam.errors import DamError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dam", description="Merge Hugging Face causal LMs: DAM and classic methods.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args) or 0
    except DamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written at the output path", file=sys.stderr)
        return 130


_COMMANDS: list = []


if __name__ == "__main__":
    sys.exit(main())
