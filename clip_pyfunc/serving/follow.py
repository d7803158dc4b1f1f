"""The app follows its alias: a promotion's new models and collection are loaded beside the old and swapped in.

`Current` holds the service the app answers from (serving.service.EmbeddingService). A request
takes it once, at its start (`Current.use`), and answers from it to the end, so a request that
began before a swap finishes on the old pair. The swap replaces the reference in one step under
a lock; the old pair's store is closed when its last request is done.

`Follower` asks the registry what the alias names now (promotion.live: a promotion cut off after
its commit counts as done), and when that changed, loads the new pair and collection
(serving.loading.load, which refuses a text model, an image model and a collection of different
spaces), then swaps. It runs every `app.follow_seconds` in a thread, and on `POST /admin/reload`.
A failed reload leaves the old pair serving and is reported in /health.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("clip_pyfunc.serving.app.follow")


def release_memory() -> None:
    """Collect what was freed and hand glibc's free pages back to the system (malloc_trim(3)). Without it the
    pages of a swapped-out pair stay in the allocator's arenas, and the next swap's load comes on top of them."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        pass


def _release_later(delay: float) -> None:
    time.sleep(delay)
    release_memory()


class Current:
    """The service requests are answered from, swapped in one step (thread-safe)."""

    RETIRE_DELAY = 0.5  # seconds before a retired service's memory is released: the request that finished with it unwinds

    def __init__(self, service, on_retire: Callable[[Any], None] | None = None):
        """Args:
            service: The first service.
            on_retire: Called with a service once it is swapped out and its last request is done (closes
                its store).
        """
        self._service = service
        self._users: dict[int, int] = {}
        self._retired: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._on_retire = on_retire
        self.since = time.time()

    @property
    def service(self):
        """The service new requests get now."""
        return self._service

    def services(self) -> list:
        """The service now and those swapped out whose requests still run."""
        with self._lock:
            return [self._service, *self._retired.values()]

    @contextlib.contextmanager
    def use(self):
        """The service now, held for the caller's request: it is not retired until the block ends."""
        with self._lock:
            service = self._service
            self._users[id(service)] = self._users.get(id(service), 0) + 1
        try:
            yield service
        finally:
            with self._lock:
                self._users[id(service)] -= 1
                done = self._users[id(service)] == 0 and id(service) in self._retired
                if done:
                    del self._users[id(service)]
                    del self._retired[id(service)]
            if done:
                self._retire(service)

    def swap(self, service) -> None:
        """Answer new requests from `service`; the old one is retired once its requests are done."""
        with self._lock:
            old, self._service = self._service, service
            self.since = time.time()
            idle = not self._users.get(id(old))
            if not idle:
                self._retired[id(old)] = old
            else:
                self._users.pop(id(old), None)
        if idle:
            self._retire(old)

    def _retire(self, service) -> None:
        """Run `on_retire` now (the old store closes at once: a rollback may open its collection again right
        away), then, in a thread of its own once the frames that finished with `service` are gone, collect
        it and hand its pages back to the system (`release_memory`)."""
        try:
            if self._on_retire is not None:
                self._on_retire(service)
        except Exception:  # a store that fails to close must not fail the request that finished last
            log.exception("closing the previous models' index failed")
        threading.Thread(target=_release_later, args=(self.RETIRE_DELAY,), name="clip-retire", daemon=True).start()


class Follower:
    """Reloads the app when its alias names other models or another collection (see the module docstring)."""

    RETRY_SECONDS = 15.0  # a reload that failed is tried again for the same target after this long (or when asked)

    def __init__(self, current: Current, resolve: Callable[[], Any], build: Callable[[Any], Any],
                 interval: float = 0.0, *, serving):
        """Args:
            current: What the routes answer from.
            resolve: Returns what the alias names now (promotion.Live), cheap: registry reads only.
            build: Loads a service for a Live (its models and collection); raises when they are not one space.
            interval: Seconds between looks at the registry; 0 looks only when asked (`check`).
            serving: The Live `current`'s service was loaded from (not resolved again here: a promotion
                between that load and now would otherwise never be loaded).
        """
        self.current, self._resolve, self._build, self.interval = current, resolve, build, interval
        self.serving = serving
        self._failed: tuple[Any, float, str] | None = None  # (the key a reload failed for, when, why)
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {"at": None, "changed": False, "error": None}
        self._stop = threading.Event()

    def check(self, force: bool = False) -> dict[str, Any]:
        """Look at the registry now; load and swap in what the alias names when it changed.

        A target whose reload failed is tried again after `RETRY_SECONDS`, or at once with `force`
        (POST /admin/reload), not at every look: each try loads both models.

        Returns:
            {"changed": bool, "serving": the models and collection answering now, "seconds" (the load and swap),
            "error": why a reload failed (the old pair keeps serving), or None}.
        """
        with self._lock:  # one reload at a time; a second caller waits and then finds nothing new
            started = time.perf_counter()
            result: dict[str, Any] = {"changed": False, "error": None}
            try:
                now = self._resolve()
                failed = self._failed
                if now.key() == self.serving.key():
                    self._failed = None  # back to what serves (a rollback): a later try of the other starts afresh
                elif failed and failed[0] == now.key() and not force and time.time() - failed[1] < self.RETRY_SECONDS:
                    result["error"] = failed[2]  # still failing: not tried again yet
                else:
                    self._failed = (now.key(), time.time(), "loading")
                    try:
                        service = self._build(now)
                    except Exception as e:
                        self._failed = (now.key(), time.time(), f"{type(e).__name__}: {e}")
                        raise
                    self._failed = None
                    self.current.swap(service)
                    log.warning("now serving %s and collection %s (was %s, %s)", now.models, now.collection,
                                self.serving.models, self.serving.collection)
                    self.serving = now
                    result["changed"] = True
            except Exception as e:  # the registry or a load failed: keep serving what we have, say why
                result["error"] = f"{type(e).__name__}: {e}"
                log.warning("reload failed, still serving %s: %s", self.serving.models, result["error"])
            result["seconds"] = round(time.perf_counter() - started, 3)
            self.last = {"at": time.time(), **result}
            return {**result, "serving": self.describe()}

    def describe(self) -> dict[str, Any]:
        """The models and collection answering now."""
        return {"models": dict(self.serving.models), "collection": self.serving.collection,
                "since": self.current.since}

    def start(self) -> None:
        """Look every `interval` seconds in a daemon thread (nothing when the interval is 0)."""
        if self.interval > 0:
            threading.Thread(target=self._run, name="clip-pyfunc-follow", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
