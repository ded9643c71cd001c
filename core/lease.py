"""A lease on an object-store folder: one run at a time where there is no flock.

The lease is one object, OUT/_lock: {"owner", "host", "pid", "expires"} (unix seconds). A run
takes it when it is absent, expired, or already its own; it writes its own, reads it back
after a short pause (another run that wrote in between wins, and this one is refused), and a
daemon thread renews it every TTL/3 seconds while the process lives. A clean exit deletes it;
a killed driver's lease simply expires after TTL seconds, so a rerun after a crash waits at
most that long (the refusal says how long). Object stores read their own writes consistently
(S3 since 2020, GCS always), which is all this needs; two runs starting within the pause of
each other on different machines are the one race left, and the later writer wins.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from core import atomic
from core.errors import UserError
from core.storage import RemotePath

TTL_SECONDS = 90.0
SETTLE_SECONDS = 0.5
_OWNER = uuid.uuid4().hex
_HELD: dict[str, RemotePath] = {}
_LOCK = threading.Lock()


class LeaseBusyError(UserError):
    """Another live run holds the folder's lease."""


def _read(obj: RemotePath) -> dict[str, Any] | None:
    try:
        return json.loads(obj.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write(obj: RemotePath) -> None:
    atomic.write_json(obj, {"owner": _OWNER, "host": socket.gethostname(), "pid": os.getpid(),
                            "expires": time.time() + TTL_SECONDS})


def _refuse(folder: str, held: dict[str, Any]) -> LeaseBusyError:
    left = max(0, int(held.get("expires", 0) - time.time()))
    return LeaseBusyError(f"{folder}: another run is writing this folder (pid {held.get('pid')} on "
                          f"{held.get('host')}); its lease expires in {left} s if that run is gone")


def hold(obj: RemotePath) -> None:
    """Take the lease `obj` for this process (a second call is a no-op), or raise LeaseBusyError."""
    with _LOCK:
        if str(obj) in _HELD:
            return
        held = _read(obj)
        if held and held.get("owner") != _OWNER and held.get("expires", 0) > time.time():
            raise _refuse(str(obj.parent), held)
        _write(obj)
        time.sleep(SETTLE_SECONDS)
        held = _read(obj)
        if not held or held.get("owner") != _OWNER:
            raise _refuse(str(obj.parent), held or {})
        _HELD[str(obj)] = obj
        if len(_HELD) == 1:
            threading.Thread(target=_renew_forever, name="tessera-lease", daemon=True).start()


def release(obj: RemotePath) -> None:
    with _LOCK:
        if _HELD.pop(str(obj), None) is not None:
            obj.unlink(missing_ok=True)


def _renew_forever() -> None:
    while True:
        time.sleep(TTL_SECONDS / 3)
        with _LOCK:
            for obj in list(_HELD.values()):
                try:
                    _write(obj)
                except OSError:  # a blip of the store: the next renewal tries again
                    pass


@atexit.register
def _release_all() -> None:
    for obj in list(_HELD.values()):
        try:
            release(obj)
        except OSError:
            pass
