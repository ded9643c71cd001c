"""One deadline per URL, enforced on every blocking step of a fetch.

A socket timeout bounds one blocking call, not a request: a server that sends its headers one
byte a second never trips a 10 s timeout, and `getaddrinfo` takes no timeout at all. So:

  * `Deadline`: the instant a URL's time runs out (`max_download_seconds` after its first
    attempt started); `budget(stall)` is the socket timeout to set before a blocking call;
  * `cut_at(deadline, sock)`: the process's `Alarm` thread shuts the connection down at the
    deadline, which wakes any read blocked in it (http.client's header parser, TLS, the body);
    the caller sees `cut.fired` and reports a timeout, never the partial bytes it got;
  * `resolve(host, port, deadline, resolver)`: DNS in a helper thread (`Lookups`), abandoned at
    the deadline (that thread is free again when the system resolver gives up; nothing waits).
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterator

Resolver = Callable[..., list]  # socket.getaddrinfo's signature and result


class Deadline:
    """The monotonic instant a URL's time runs out."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self, what: str) -> None:
        if self.expired():
            raise self.timeout(what)

    def timeout(self, what: str) -> TimeoutError:
        return TimeoutError(f"timed out: {what} not done within the {self.seconds:g} s download deadline")

    def budget(self, stall: float, what: str) -> float:
        """The socket timeout for the next blocking call: the stall limit, or less when the
        deadline is nearer; TimeoutError when it has passed."""
        self.check(what)
        return min(stall, self.remaining())


class Alarm:
    """One thread per process that calls each armed function at its instant (a heap of timers;
    a cancelled timer is dropped lazily, and the heap compacted when most of it is cancelled)."""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread does not survive a fork

    def _reset(self) -> None:
        self._pid = -1  # the process whose thread serves the heap; -1: none started yet
        self._heap: list[list[Any]] = []  # [at, seq, fn or None once cancelled]
        self._cancelled = 0
        self._cond = threading.Condition()

    def arm(self, at: float, fn: Callable[[], None]) -> list[Any]:
        entry = [at, next(self._seq), fn]
        with self._cond:
            if self._pid != os.getpid():  # first use in this process: start the thread
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="download-deadline", daemon=True).start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        with self._cond:
            if entry[2] is not None:
                entry[2] = None
                self._cancelled += 1
                if self._cancelled > 1024 and self._cancelled * 2 > len(self._heap):
                    self._heap = [e for e in self._heap if e[2] is not None]
                    heapq.heapify(self._heap)
                    self._cancelled = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._pop_due()
                if not due:
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                    continue
            for fn in due:
                with contextlib.suppress(Exception):  # one failing timer must not stop the others
                    fn()

    def _pop_due(self) -> list[Callable[[], None]]:
        due, now = [], time.monotonic()
        while self._heap and (self._heap[0][2] is None or self._heap[0][0] <= now):
            _, _, fn = heapq.heappop(self._heap)
            if fn is None:
                self._cancelled -= 1
            else:
                due.append(fn)
        return due


ALARM = Alarm()


class Cut:
    """Whether the alarm shut a connection down (its reads then end early: a timeout)."""

    fired = False


@contextlib.contextmanager
def cut_at(deadline: Deadline, sock: socket.socket) -> Iterator[Cut]:
    """Shut `sock`'s connection down at the deadline. The alarm holds a duplicate of the file
    descriptor: shutdown acts on the connection, so it reaches the socket even after TLS
    wrapping has moved the descriptor to another object."""
    cut, twin = Cut(), sock.dup()

    def fire() -> None:
        cut.fired = True
        with contextlib.suppress(OSError):
            twin.shutdown(socket.SHUT_RDWR)

    entry = ALARM.arm(deadline.at, fire)
    try:
        yield cut
    finally:
        ALARM.cancel(entry)
        twin.close()


class Lookups:
    """Threads that run DNS lookups, reused (starting a thread per lookup doubled the CPU cost
    of a loopback fetch); a new one starts whenever none is idle, so a lookup stuck in the
    system resolver never delays another. Idle threads end after IDLE_SECONDS."""

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job that no submit has claimed yet
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._lock:
            start = self._idle == 0
            self._idle -= 0 if start else 1
        if start:
            threading.Thread(target=self._work, name="download-dns", daemon=True).start()
        self._jobs.put((fn, future))
        return future

    def _work(self) -> None:
        while True:
            try:
                fn, future = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # else a submit has claimed this thread: its job is on the way
                        self._idle -= 1
                        return
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                future.set_exception(exc)
            with self._lock:
                self._idle += 1


LOOKUPS = Lookups()


def resolve(host: str, port: int, deadline: Deadline, resolver: Resolver) -> list[tuple]:
    """`resolver(host, port, type=SOCK_STREAM)` (getaddrinfo) within the deadline; its own
    errors (socket.gaierror: `Name or service not known`) pass through."""
    future = LOOKUPS.submit(functools.partial(resolver, host, port, type=socket.SOCK_STREAM))
    try:
        return future.result(timeout=max(0.0, deadline.remaining()))
    except FutureTimeout:
        raise deadline.timeout(f"DNS lookup of {host}") from None
