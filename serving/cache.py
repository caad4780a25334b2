"""Composed adapters on disk: a content-addressed directory store that several processes may share,
and a bounded in-process LRU over it whose entries in use (leased) are never evicted.

Every composition lives in ``<cache_dir>/<key[:32]>``, where the key is a sha256 over the adapters'
checksums, the quantised weights, the method and the rank limit, so two processes that need one
composition agree on its directory. A writer builds into a private hidden directory and renames it into
place (``rename`` is atomic, and fails when another writer got there first, which then uses theirs), so
no reader ever sees a partial directory. A lease holds a shared ``flock`` on ``.locks/<name>``; eviction
takes the exclusive lock without waiting and skips a directory another process is using.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .grammar import Composition

MANIFEST = "loramerge.json"


@dataclass(frozen=True)
class ComposedAdapter:
    """A composition written as a PEFT adapter directory, what vLLM (or PEFT) loads."""

    key: str
    """sha256 of the canonical key: adapter names and sha256s, quantised weights, method, parameters."""
    composition: Composition
    lora_name: str
    lora_int_id: int
    path: Path
    rank: int
    source_rank: int
    truncated: bool
    max_rel_error: float
    owned: bool = True
    """False when ``path`` is the user's own adapter directory (never deleted)."""

    def describe(self) -> dict:
        return {
            "label": self.composition.label, "kind": self.composition.kind, "key": self.key,
            "adapters": dict(self.composition.terms), "method": self.composition.method,
            "lora_name": self.lora_name, "rank": self.rank, "source_rank": self.source_rank,
            "truncated": self.truncated, "max_rel_error": self.max_rel_error, "routed": self.composition.routed,
        }


# --------------------------------------------------------------------------- the directory store


class DirLocks:
    """Advisory ``flock`` locks, one file per composition directory (shared: in use; exclusive: removing)."""

    def __init__(self, root: Path):
        self.root = root / ".locks"
        self.root.mkdir(parents=True, exist_ok=True)

    def _open(self, name: str) -> IO[bytes]:
        return open(self.root / f"{name}.lock", "ab")  # noqa: SIM115 - held across calls

    def share(self, name: str) -> IO[bytes]:
        fh = self._open(name)
        fcntl.flock(fh, fcntl.LOCK_SH)
        return fh

    @contextlib.contextmanager
    def exclusive_now(self, name: str) -> Iterator[bool]:
        """Yield True with the exclusive lock held, or False when another process holds it shared."""
        with self._open(name) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class CompositionStore:
    """A content-addressed directory of composed adapters, safe to share between processes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.locks = DirLocks(self.root)

    def path_for(self, name: str) -> Path:
        return self.root / name

    def manifest(self, name: str, key: str) -> dict | None:
        """The manifest of a complete directory for ``key`` (None when there is none)."""
        try:
            data = json.loads((self.root / name / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("key") == key else None

    def publish(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write into a private directory and rename it into place; if another writer won, use theirs."""
        final = self.root / name
        private = self.root / f".build-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write(private)
            try:
                os.rename(private, final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(private, ignore_errors=True)
        return final

    def remove(self, path: Path) -> bool:
        """Delete a composition directory unless another process holds it; True when it is gone."""
        if not path.exists():
            return True
        with self.locks.exclusive_now(path.name) as mine:
            if not mine:
                return False
            trash = self.root / f".trash-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, trash)
            except OSError:
                return not path.exists()
        shutil.rmtree(trash, ignore_errors=True)
        return True


# --------------------------------------------------------------------------- the in-process LRU


@dataclass
class _Entry:
    adapter: ComposedAdapter
    leases: int = 0
    lock: IO[bytes] | None = None


class CompositionCache:
    """A bounded LRU of written adapter directories. Leased entries (in-flight requests) are never evicted.

    ``capacity=None`` never evicts (the vLLM resolver mode, where the server may reload a path at any time).
    ``store``: the shared directory store; a lease then also holds the directory's shared lock.
    """

    def __init__(self, capacity: int | None = 64, store: CompositionStore | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.capacity = capacity
        self.store = store
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _lease(self, entry: _Entry) -> None:
        entry.leases += 1
        if entry.leases == 1 and self.store is not None and entry.adapter.owned:
            entry.lock = self.store.locks.share(entry.adapter.path.name)

    def _unlease(self, entry: _Entry) -> None:
        entry.leases = max(entry.leases - 1, 0)
        if entry.leases == 0 and entry.lock is not None:
            entry.lock.close()
            entry.lock = None

    def get(self, key: str, *, lease: bool = False) -> ComposedAdapter | None:
        """The entry (most recently used now), leased atomically when ``lease``; None if its directory is gone."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if lease:
                self._lease(entry)
            if not entry.adapter.path.is_dir():  # removed by another process: rebuild
                if lease:
                    self._unlease(entry)
                return None
            self._entries.move_to_end(key)
            return entry.adapter

    def put(self, adapter: ComposedAdapter, *, lease: bool = False) -> bool:
        """Add (or refresh) an entry; with ``lease``, False when its directory vanished before the lease held."""
        with self._lock:
            old = self._entries.get(adapter.key)
            entry = _Entry(adapter, leases=old.leases if old else 0, lock=old.lock if old else None)
            self._entries[adapter.key] = entry
            self._entries.move_to_end(adapter.key)
            ok = True
            if lease:
                self._lease(entry)
                if not adapter.path.is_dir():
                    self._unlease(entry)
                    ok = False
            victims = self._pick_victims()
        for victim in victims:
            self._remove_dir(victim)
        return ok

    def _pick_victims(self) -> list[ComposedAdapter]:
        if self.capacity is None:
            return []
        victims = []
        for key in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            entry = self._entries[key]
            if entry.leases == 0:
                del self._entries[key]
                victims.append(entry.adapter)
                self.evictions += 1
        return victims

    def acquire(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._lease(entry)

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._unlease(entry)
            victims = self._pick_victims()
        for victim in victims:
            self._remove_dir(victim)

    def leases(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.leases if entry else 0

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            if entry.lock is not None:
                entry.lock.close()
            self._remove_dir(entry.adapter)

    def _remove_dir(self, adapter: ComposedAdapter) -> None:
        if not adapter.owned:
            return
        if self.store is not None and adapter.path.parent == self.store.root:
            self.store.remove(adapter.path)
        else:
            shutil.rmtree(adapter.path, ignore_errors=True)


__all__ = ["MANIFEST", "ComposedAdapter", "CompositionCache", "CompositionStore", "DirLocks"]
