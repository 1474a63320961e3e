"""Entry point of the ``raksha`` command: parses arguments, maps errors to stable codes and exit statuses."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from raksha import __version__
from raksha.cli import db_cmd, serve, service_cmd, vault_cmd
from raksha.cli.output import report_error
from raksha.domain.errors import EXIT_INTERRUPTED, Interrupted, RakshaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raksha", description="Raksha: data protection for KVM clouds.")
    parser.add_argument("--version", action="version", version=f"raksha {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    vault_cmd.register(sub)
    db_cmd.register(sub)
    serve.register(sub)
    service_cmd.register(sub)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    # Unwinds like Ctrl-C: staged files removed, locks released, nothing stored is touched.
    raise Interrupted("terminated by SIGTERM; nothing stored was lost, re-run the command to resume")


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
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
