"""Entry point of the ``raksha`` command: parses arguments, maps errors to stable codes and exit statuses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raksha import __version__
from raksha.cli import vault_cmd
from raksha.cli.output import report_error
from raksha.domain.errors import EXIT_INTERRUPTED, RakshaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raksha", description="Raksha: data protection for KVM clouds.")
    parser.add_argument("--version", action="version", version=f"raksha {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    vault_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except RakshaError as err:
        return report_error(err, as_json)
    except KeyboardInterrupt:
        print("\nraksha: interrupted; nothing stored was lost, re-run the command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
