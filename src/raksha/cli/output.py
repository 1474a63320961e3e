"""How the CLI talks to people and machines: progress on a terminal, JSON with --json, errors with codes."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from raksha.domain.errors import RakshaError

if TYPE_CHECKING:
    from raksha.vault.engine.progress import ProgressCallback, ProgressEvent


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


human_bytes = _human


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class TerminalProgress:
    """A one-line bar on stderr when it is a terminal; periodic plain lines with --progress=lines."""

    def __init__(self, stream: TextIO = sys.stderr, mode: str = "auto") -> None:
        self.stream = stream
        self.mode = ("bar" if stream.isatty() else "none") if mode == "auto" else mode
        self._last_line = 0.0
        self._drawn = False

    def callback(self) -> ProgressCallback | None:
        return None if self.mode == "none" else self._on_event

    def _on_event(self, e: ProgressEvent) -> None:
        if e.unit == "B":
            text = (f"{e.phase}: {e.fraction * 100:5.1f}%  {_human(e.done)}/{_human(e.total)}  "
                    f"{e.rate / 1e6:7.1f} MB/s  ETA {_eta(e.eta)}")
        else:
            text = f"{e.phase}: {e.fraction * 100:5.1f}%  {e.done}/{e.total} {e.unit}  ETA {_eta(e.eta)}"
        if self.mode == "bar":
            self.stream.write("\r" + text + "\033[K")
            self._drawn = True
        elif time.monotonic() - self._last_line >= 2 or e.done >= e.total:
            self._last_line = time.monotonic()
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    elif text is not None:
        print(text)


def report_error(err: RakshaError, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": err.to_dict()}, indent=1, sort_keys=True, default=str))
    print(f"raksha: error [{err.code}]: {err.message}", file=sys.stderr)
    if err.retryable:
        print("raksha: this may succeed if tried again later", file=sys.stderr)
    return err.exit_status


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
