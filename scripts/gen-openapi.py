#!/usr/bin/env python3
"""Write docs/api/openapi.json from the route table and schemas (tests fail when it is stale)."""

import json
import sys
from pathlib import Path

from raksha.api import openapi_spec

out = Path(__file__).resolve().parent.parent / "docs" / "api" / "openapi.json"
out.write_text(json.dumps(openapi_spec.build(), indent=2, sort_keys=True) + "\n")
print(f"wrote {out}", file=sys.stderr)
