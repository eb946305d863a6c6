"""``submit``: the asynchronous form of a role group's blocking calls.

A role group (rollout workers, a learner group) is driven by blocking methods that fan out to
its Ray actors and wait. ``group.submit("train_bt", ...)`` runs such a method on the group's
own thread and returns a :class:`concurrent.futures.Future` at once, so the driver can overlap
groups (D's BT update beside G's PPO update; the next batch's generation beside both). Calls on
one group keep their order (one thread per group); Ray releases the GIL while a thread waits.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class AsyncCalls:
    """Mixin: ``submit(fn, *args, **kwargs) -> Future`` of ``fn(*args, **kwargs)`` on the
    group's thread, ``fn`` a callable or the name of one of the group's methods."""

    _executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=type(self).__name__)
        call = getattr(self, fn) if isinstance(fn, str) else fn
        return self._executor.submit(call, *args, **kwargs)

    def close_calls(self) -> None:
        """Drop queued calls (a running one finishes on its own); called by ``shutdown``."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
