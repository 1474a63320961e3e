"""``raksha.wsgi.api:application``: the API for a WSGI server, with scheduler and workers in the same process.

Configuration comes from ``$RAKSHA_CONFIG`` (a file; default /etc/raksha/raksha.conf when present).
"""

from __future__ import annotations

import os

from raksha import conf as config
from raksha.wsgi.embedded import Embedded


def _build() -> object:
    path = os.environ.get("RAKSHA_CONFIG") or "/etc/raksha/raksha.conf"
    server = Embedded(config.load([], config_files=[path] if os.path.exists(path) else []))
    server.start_background()
    return server.app


application = _build()
