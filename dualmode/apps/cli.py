"""The `dualmode` command: `dualmode tutorial` and `dualmode bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dualmode",
        description="Per-layer learning rates for PyTorch, in eager mode and in a compiled graph mode.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    from dualmode.apps.bench import command as bench
    from dualmode.apps.tutorial import command as tutorial

    for module in (tutorial, bench):
        sub = commands.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
