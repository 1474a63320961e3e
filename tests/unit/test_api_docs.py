"""docs/api/README.md (written by scripts/api-examples.py from real calls) shows every route of the API."""

from __future__ import annotations

import re
from pathlib import Path

from raksha.api.urls import routes

README = Path(__file__).resolve().parents[2] / "docs" / "api" / "README.md"


def test_every_route_has_an_example_in_the_api_readme() -> None:
    text = README.read_text()
    listed = set(re.findall(r"`([A-Z]+ /[^`]*)`", text))
    missing = [f"{method} {path}" for method, path, _ in routes() if f"{method} {path}" not in listed]
    assert not missing, f"docs/api/README.md lacks {missing}: run .venv/bin/python scripts/api-examples.py"
    # Each example is a curl request and the answer it got.
    assert text.count("```sh\ncurl ") == text.count("```http\nHTTP/1.1 ") > 30
