"""The dataset lease: one writing run per dataset at a time.

Two runs writing one dataset at once overwrite each other's work (both number their new ingest shards from the
last existing one). A run holds the object `<dataset>/_lease.json` while it writes: created only if absent (an
atomic conditional write), renewed by a thread well before it expires, removed at the end. The lease of a run
that died (SIGKILL, lost host) expires, and the next run takes it over by a compare-and-swap, so of two runs
taking over the same stale lease only one wins.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from infra.store import ArtifactStore, StoreError

LEASE = "_lease.json"
DEFAULT_TTL = 120.0  # seconds a lease stays valid unrenewed; it is renewed every ttl/4
TAKE_ATTEMPTS = 5  # the lease can change hands between our create, read and take-over: look again a few times

log = logging.getLogger("capfactory")


class LeaseHeld(StoreError):
    """Another run holds the dataset's lease."""


class LeaseLost(StoreError):
    """The run's lease expired unrenewed or was broken, and another run may have written the dataset since."""


def _owner() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (containers)
        user = str(os.getuid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user}


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _expires(record: dict) -> float:
    return datetime.fromisoformat(record["expires"]).timestamp()


def _gone(owner: dict) -> bool:
    """The holder ran on this host and its process no longer exists (killed): its lease need not wait to expire,
    so a killed run can be resumed at once."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError, KeyError):  # not ours to signal, or no usable pid: assume alive
        return False
    return False


class DatasetLease:
    """The lease of one run on one dataset; `dataset_lease` takes, renews and releases it."""

    def __init__(self, store: ArtifactStore, dataset: str, run_id: str, ttl: float = DEFAULT_TTL):
        self.store, self.dataset, self.run_id, self.ttl = store, dataset, run_id, ttl
        self.key = f"{dataset}/{LEASE}"
        self.owner = _owner()
        self.acquired = time.time()
        self.lost: str | None = None  # why the lease was lost, if it was
        self._body = b""  # the lease object as we last wrote it: what each compare-and-swap expects

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"run_id": self.run_id, "owner": self.owner, "acquired": _stamp(self.acquired),
                           "renewed": _stamp(now), "expires": _stamp(now + self.ttl)}, sort_keys=True).encode()

    def _held(self, record: dict) -> str:
        o = record["owner"]
        return (f"dataset {self.dataset!r} in {self.store.uri} is being written by run {record['run_id']} "
                f"(user {o['user']}, pid {o['pid']} on {o['host']}) since {record['acquired']}; its lease expires "
                f"at {record['expires']} unless that run renews it. Run again when it has finished; if that run is "
                f"gone, its lease is taken over once expired, or break it now by deleting {self.store.uri}/{self.key}")

    def acquire(self) -> None:
        """Take the lease, or take over an expired one; LeaseHeld if another run holds it."""
        for _ in range(TAKE_ATTEMPTS):
            body = self._record()
            if self.store.put_bytes_if_absent(self.key, body):
                self._body = body
                return
            try:
                current = self.store.get_bytes(self.key)
            except StoreError:
                continue  # released between our create and our read
            record = json.loads(current)
            gone = _gone(record["owner"])
            if _expires(record) > time.time() and not gone:
                raise LeaseHeld(self._held(record))
            if self.store.replace_bytes_if(self.key, body, current):
                log.warning("took over the lease of run %s on %s (%s)", record["run_id"], self.dataset,
                            f"its process {record['owner']['pid']} on this host is gone" if gone
                            else f"expired at {record['expires']}")
                self._body = body
                return
        raise LeaseHeld(f"the lease of dataset {self.dataset!r} in {self.store.uri} changed hands "
                        f"{TAKE_ATTEMPTS} times while this run tried to take it; another run is starting on it")

    def renew(self) -> bool:
        """Push the expiry out by ttl; False (and `lost` set) if the lease is no longer ours."""
        body = self._record()
        if self.store.replace_bytes_if(self.key, body, self._body):
            self._body = body
            return True
        self.lost = (f"run {self.run_id} lost its lease on dataset {self.dataset!r} (it expired unrenewed or was "
                     f"broken): another run may have written the dataset meanwhile; check it, then run again")
        return False

    def keep(self, stop: threading.Event, every: float) -> None:
        """Renew every `every` seconds until `stop` is set or the lease is lost."""
        while not stop.wait(every):
            try:
                if not self.renew():
                    log.error("%s", self.lost)
                    return
            except Exception as e:  # a store hiccup: the ttl leaves room for the next few attempts
                log.warning("could not renew the lease on %s: %s", self.dataset, e)

    def release(self) -> None:
        """Remove the lease if it is still ours (a lost one belongs to someone else now)."""
        if self.lost:
            return
        try:
            self.store.delete_if(self.key, self._body)
        except Exception as e:  # the run's work is done; the lease expires on its own
            log.warning("could not release the lease on %s (it expires within %.0f s): %s", self.dataset,
                        self.ttl, e)


@contextmanager
def dataset_lease(store: ArtifactStore, dataset: str, *, run_id: str | None = None, ttl: float = DEFAULT_TTL,
                  renew_every: float | None = None) -> Iterator[DatasetLease]:
    """Hold the lease of `dataset` for the block: LeaseHeld at once if another run holds it, LeaseLost at the end
    if the lease was lost meanwhile."""
    lease = DatasetLease(store, dataset, run_id or uuid.uuid4().hex, ttl)
    lease.acquire()
    stop = threading.Event()
    keeper = threading.Thread(target=lease.keep, args=(stop, renew_every or ttl / 4), daemon=True,
                              name=f"lease-{dataset}")
    keeper.start()
    try:
        yield lease
    finally:
        stop.set()
        keeper.join()
        lease.release()
    if lease.lost:
        raise LeaseLost(lease.lost)
