"""``raksha serve``: the embedded all-in-one server on 127.0.0.1:8791 (waitress)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the all-in-one server (API, scheduler, agent)",
                       description="Run API, scheduler, orchestration and agent in one process.")
    p.add_argument("--config-file", action="append", default=[], help="oslo.config file(s)")
    p.add_argument("--data-dir", help="database, vault and restored disks (default /var/lib/raksha as root)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8791)")
    p.add_argument("--libvirt-uri", help="libvirt connection (default qemu:///system)")
    p.add_argument("--strategy", choices=["pull", "snapshot"], help="backup strategy of the local agent")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from waitress.server import create_server

    from raksha import conf as config  # oslo.config and the service load only for `serve`
    from raksha.wsgi.embedded import Embedded

    started = time.monotonic()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress").setLevel(logging.WARNING)
    conf = config.load([], config_files=args.config_file)
    for opt, group, value in (("data_dir", None, args.data_dir), ("host", "api", args.host),
                              ("port", "api", args.port), ("uri", "libvirt", args.libvirt_uri),
                              ("strategy", "libvirt", args.strategy)):
        if value is not None:
            conf.set_override(opt, value, group=group)
    server = Embedded(conf)
    server.start_background()
    wsgi = create_server(server.app, host=conf.api.host, port=conf.api.port, threads=conf.api.threads,
                         ident="raksha")

    def stop(signum: int, frame: object) -> None:
        wsgi.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"raksha: serving http://{conf.api.host}:{conf.api.port}/ (data in {conf.data_dir}; "
          f"ready in {time.monotonic() - started:.2f} s)", file=sys.stderr, flush=True)
    try:
        wsgi.run()
    except OSError:
        pass  # the listening socket was closed by stop()
    finally:
        server.stop()
    return 0
