"""The in-process transport of the embedded server: casts run on a bounded pool of worker threads.

It has the shape of an RPC client (``cast`` = fire and forget, ``call`` = wait for the answer)
so that the orchestrator and agent can move to other processes or hosts behind
oslo.messaging without their callers changing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from raksha.domain.errors import InvalidInput

LOG = logging.getLogger(__name__)


class InProcessTransport:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raksha-worker")
        self._endpoints: dict[str, Any] = {}
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()

    def register(self, topic: str, endpoint: Any) -> None:
        self._endpoints[topic] = endpoint

    def _method(self, topic: str, method: str) -> Callable[..., Any]:
        endpoint = self._endpoints.get(topic)
        fn = getattr(endpoint, method, None) if endpoint is not None else None
        if fn is None or method.startswith("_"):
            raise InvalidInput(f"no RPC method {topic}.{method}", code="RPC_NO_METHOD")
        return fn  # type: ignore[no-any-return]

    def call(self, topic: str, method: str, **kwargs: Any) -> Any:
        return self._method(topic, method)(**kwargs)

    def cast(self, topic: str, method: str, **kwargs: Any) -> Future[Any]:
        fn = self._method(topic, method)

        def run() -> Any:
            try:
                return fn(**kwargs)
            except Exception:
                # The endpoint records failures on the resource itself; this is the last resort.
                LOG.exception("cast %s.%s failed", topic, method)
                raise

        future = self._pool.submit(run)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    def shutdown(self, *, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
