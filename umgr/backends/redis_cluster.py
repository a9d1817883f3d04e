"""The redis backend: pages in a Redis Cluster (far memory on a store people
already run).

Each slot is one key, `PREFIX:INSTANCE:SLOT`, INSTANCE random per daemon,
so the keys of one daemon spread over every hash slot of the cluster and two
daemons never share one. A batch is one cluster pipeline (redis-py groups
its commands by node and sends each group in one round trip); up to
`clients` batches are in flight at once, each in a worker thread (redis-py
is synchronous; its cluster client and connection pools are thread safe),
so the daemon's thread never waits on the network.

A freed slot's key is not deleted: it is overwritten when the slot is used
again, as a swap file's blocks are (a delete racing a later write of the
same slot could lose that write). The daemon's keys are deleted when it
closes the backend. Redis memory used is thus the most slots used at once.

Each value is the page behind a header of its slot and a tag, a number
drawn for that write, which the daemon keeps for each slot (4 bytes a slot;
with saved state, in a file beside it, so that a restarted daemon checks
too). Redis Cluster replicates asynchronously: a failover may lose writes
the old master acknowledged, and a write that timed out may still be
applied later. Either way a key may hold an older page of its slot, whole
and of the right size; its tag tells it from the page last written there,
and the read fails, never serving the old page.

Failure policy: no page is ever served wrong. A write that fails raises
BackendError (the daemon keeps the pages resident and retries later). A read
that fails is retried for up to `wait` seconds (a replica's failover takes
the cluster's node timeout), then raises BackendError, and the daemon kills
the target whose page it was, with the reason: its memory cannot be given
back. A key that is missing, not a page, or an older page of its slot is
such a failure too, never a page of zeros or a stale one. With `cluster-require-full-coverage no` on the nodes, a
dead master costs only the pages whose keys it held.

The password can come from UMGR_REDIS_PASSWORD rather than the command
line (which other users can read in /proc).
"""
from __future__ import annotations

import ctypes
import logging
import os
import secrets
import struct
import time

import numpy as np
import trio

from umgr import cpuclock
from umgr.backends import Backend
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE
from umgr.kernel.sharedmap import reserve

log = logging.getLogger("umgr.backend")

RETRY_PAUSE = 0.2   # seconds between tries of a failing read
# Retries inside redis-py, after a topology refresh, without pausing: a
# read's own retries (wait=, RETRY_PAUSE apart) pace the rest. redis-py's
# default (10 retries, exponential backoff between them) made 96 reads, a
# third of them from a killed node, outlast 60 s under redis-py 8.2.0 with
# wait=0.5; with one retry they took 22 s.
CLIENT_RETRIES = 1
# A value: the slot and the tag of the write that stored it, then the page.
HEADER = struct.Struct("<II")
TAGS_FILE = "redis-tags"   # with saved state: the slots' tags, beside it


def _redis():
    try:
        import redis.backoff
        import redis.cluster
        import redis.exceptions
        import redis.retry
    except ImportError:
        raise ValueError("the redis backend needs redis-py: pip install 'umgr[redis]'") from None
    return redis


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, size: int = 4 << 30, host: str = "127.0.0.1", port: int = 6379, username: str = "",
                 password: str = "", tls: int = 0, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 timeout: str = "2", wait: str = "15", clients: int = 4, prefix: str = "umgr",
                 instance: str = "", directory: str = "", reuse: bool = False):
        """host, port: any node of the cluster (the others are found from
        it); timeout: seconds for a connection or a reply; wait: seconds a
        failing read is retried before its target is killed; clients:
        batches in flight at once. `instance`: the keys' middle name, kept
        by a daemon that saves its state (umgr/daemon/statedir.py) in
        `directory`: its keys then outlive it for a restarted daemon, with
        their tags in that directory (`reuse`: a dead daemon's targets may
        come back for them), and go at remove(); without it, a random one,
        and the keys go at close()."""
        self._tags_path = os.path.join(directory, TAGS_FILE) if instance and directory else ""
        # A restarted daemon's store keeps the size it had (as the swap
        # file does): its saved tables name slots of that size.
        found = _found_slots(self._tags_path) if reuse else 0
        if found and found != size // PAGE_SIZE:
            log.info("redis: the store keeps its size of %d MiB (%s), not the %d MiB asked for",
                     found * PAGE_SIZE >> 20, self._tags_path, size >> 20)
        super().__init__(found or size // PAGE_SIZE)
        self.tags = _slot_tags(self.slots.span, self._tags_path, fresh=not reuse)
        self._next_tag = secrets.randbits(32)
        redis = _redis()
        self.timeout, self.wait = float(timeout), float(wait)
        if int(clients) < 1:
            raise ValueError("redis: clients must be at least 1")
        self._limiter = trio.CapacityLimiter(int(clients))
        self._errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self.persistent = bool(instance)
        self.prefix = f"{prefix}:{instance or secrets.token_hex(4)}:"
        options = dict(host=host, port=int(port), socket_timeout=self.timeout,
                       socket_connect_timeout=self.timeout, require_full_coverage=False,
                       max_connections=max(int(clients), 2) * 2,
                       retry=redis.retry.Retry(redis.backoff.NoBackoff(), CLIENT_RETRIES))
        if username:
            options["username"] = username
        password = password or os.environ.get("UMGR_REDIS_PASSWORD", "")
        if password:
            options["password"] = password
        if int(tls):
            options.update(ssl=True, ssl_ca_certs=tls_ca or None, ssl_certfile=tls_cert or None,
                           ssl_keyfile=tls_key or None)
        try:
            self.cluster = redis.cluster.RedisCluster(**options)
            self.cluster.ping(target_nodes=redis.cluster.RedisCluster.ALL_NODES)
        except self._errors as exc:
            raise ValueError(f"redis: cannot reach a cluster at {host}:{port}: {exc}") from None
        self.nodes = len(self.cluster.get_nodes())
        self._high_water = 0   # slots below it may have a key (deleted at close)
        log.info("redis: cluster of %d nodes via %s:%s, keys %s*", self.nodes, host, port, self.prefix)

    def _key(self, slot: int) -> str:
        return f"{self.prefix}{slot}"

    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        if len(slots) == 0:
            return
        tags = self._draw_tags(len(slots))
        # (Before the write: a read of the slot comes only after it is done.)
        self.tags[np.asarray(slots, np.int64)] = tags
        slots, addrs, tags = np.asarray(slots).tolist(), np.asarray(addrs).tolist(), tags.tolist()
        started = time.perf_counter()
        async with self._limiter:
            await cpuclock.to_thread(lambda: self._write_batch(slots, addrs, tags))
        self._high_water = max(self._high_water, max(slots) + 1)
        self._timed(started)
        self.pages_written += len(slots)

    def _draw_tags(self, n: int) -> np.ndarray:
        """n tags for a batch's writes: consecutive from a random start,
        never 0 (a slot never written here)."""
        tags = (self._next_tag + np.arange(n, dtype=np.uint64)) & 0xFFFFFFFF
        self._next_tag = int(tags[-1]) + 1
        if (tags == 0).any():   # (the count wrapped)
            tags = np.where(tags == 0, 1, tags)
        return tags.astype(np.uint32)

    def _write_batch(self, slots: list[int], addrs: list[int], tags: list[int]) -> None:
        pipe = self.cluster.pipeline(transaction=False)
        for slot, addr, tag in zip(slots, addrs, tags):
            pipe.set(self._key(slot), HEADER.pack(slot, tag) + ctypes.string_at(addr, PAGE_SIZE))
        try:
            replies = pipe.execute()
        except self._errors as exc:
            self.errors += 1
            # (A SET sent before a timeout may still be applied later, over a
            # later page of its slot: that key's tag then names an older
            # write, and its read is refused, never served. Not may_land: an
            # outage fails every batch, and slots set aside for each would
            # fill the store for good.)
            raise BackendError(f"Redis Cluster: writing {len(slots)} pages failed: {exc}") from None
        if not all(replies):
            self.errors += 1
            raise BackendError(f"Redis Cluster: {replies.count(False)} of {len(slots)} pages were not stored")

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        if len(slots) == 0:
            return
        slots, addrs = np.asarray(slots).tolist(), np.asarray(addrs).tolist()
        started = time.perf_counter()
        deadline = time.monotonic() + self.wait
        tries = 0
        while True:
            try:
                async with self._limiter:
                    await trio.to_thread.run_sync(self._read_batch, slots, addrs)
                break
            except _Unavailable as exc:
                if time.monotonic() >= deadline:
                    self.errors += 1
                    raise BackendError(f"Redis Cluster: cannot read {len(slots)} page(s) (first key "
                                       f"{self._key(slots[0])}) for {self.wait:g} s: {exc}") from None
                if tries == 0:
                    log.warning("redis: reading %d page(s) failed (%s); retrying for %g s", len(slots), exc, self.wait)
                tries += 1
                await trio.sleep(RETRY_PAUSE)
            except BackendError:
                self.errors += 1
                raise
        self.read_seconds += time.perf_counter() - started
        self._timed(started)
        self.pages_read += len(slots)

    def _read_batch(self, slots: list[int], addrs: list[int]) -> None:
        pipe = self.cluster.pipeline(transaction=False)
        for slot in slots:
            pipe.get(self._key(slot))
        try:
            pages = pipe.execute()
        except self._errors as exc:
            raise _Unavailable(str(exc) or type(exc).__name__) from None
        for slot, addr, value in zip(slots, addrs, pages):
            self._check(slot, value)
            ctypes.memmove(addr, value[HEADER.size:], PAGE_SIZE)

    def _check(self, slot: int, value: bytes | None) -> None:
        """The value is the page last written to the slot, or BackendError."""
        if value is None or len(value) != HEADER.size + PAGE_SIZE:
            what = "missing" if value is None else f"{len(value)} bytes long, not a page"
            raise BackendError(f"Redis Cluster: the page of slot {slot} (key {self._key(slot)}) is {what}")
        stored_slot, tag = HEADER.unpack_from(value)
        expected = int(self.tags[slot])
        if stored_slot != slot or (expected and tag != expected):
            raise BackendError(f"Redis Cluster: key {self._key(slot)} holds an older page of slot {slot}, not the "
                               "one last written there: the cluster lost that write (a failover after the "
                               "master acknowledged it, or a write that timed out and landed later)")

    def remove(self) -> None:
        """Delete every key of this instance, a dead daemon's too (a clean
        stop: nothing will come back for them), found by SCAN on each primary."""
        if self.cluster is None:
            return
        by_node: dict[str, list] = {}
        try:
            for node in self.cluster.get_primaries():
                client = self.cluster.get_redis_connection(node)
                by_node[node.name] = list(client.scan_iter(match=f"{self.prefix}*", count=1024))
        except self._errors as exc:
            log.warning("redis: this daemon's keys (%s*) could not all be listed: %s", self.prefix, exc)
        self._delete(by_node)
        self._high_water = 0
        if self._tags_path:
            try:
                os.unlink(self._tags_path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.cluster is None:
            return
        if not self.persistent:   # else a restarted daemon may come back for them: remove() deletes them
            by_node: dict[str, list] = {}
            for slot in range(self._high_water):
                key = self._key(slot)
                by_node.setdefault(self.cluster.get_node_from_key(key).name, []).append(key)
            self._delete(by_node)
        self.cluster.close()
        self.cluster = None

    def _delete(self, by_node: dict[str, list]) -> None:
        """Delete these keys (grouped by node), one DEL a key in pipelines of
        1024 (a node refuses a DEL of keys of two hash slots); a dead node
        does not keep the others' keys."""
        failed = None
        for keys in by_node.values():
            for first in range(0, len(keys), 1024):
                pipe = self.cluster.pipeline(transaction=False)
                for key in keys[first:first + 1024]:
                    pipe.delete(key)
                try:
                    pipe.execute()
                except self._errors as exc:
                    failed = exc
                    break
        if failed is not None:
            log.warning("redis: some of this daemon's keys (%s*) could not be deleted: %s", self.prefix, failed)

    def tier_statistics(self) -> list[dict]:
        stats = super().tier_statistics()
        stats[0]["nodes"] = self.nodes
        return stats


def _found_slots(path: str) -> int:
    """The slots of the store whose tags file is at `path` (0: none). The
    file has an entry per slot number, 0 (never handed out) included."""
    try:
        return max(os.stat(path).st_size // 4 - 1, 0) if path else 0
    except FileNotFoundError:
        return 0


def _slot_tags(span: int, path: str, fresh: bool) -> np.ndarray:
    """A tag (uint32, 0: none) per slot number below `span`: in memory, or
    in the file at `path`, which a restarted daemon finds again (`fresh`:
    a file left there is of no use, its tags go)."""
    if not path:
        return np.zeros(span, np.uint32)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if fresh:
            os.ftruncate(fd, 0)
        if os.fstat(fd).st_size != span * 4:
            os.ftruncate(fd, span * 4)
        reserve(fd, span * 4)   # (np.memmap stores into it)
    finally:
        os.close(fd)
    return np.memmap(path, np.uint32, "r+", shape=(span,))


class _Unavailable(Exception):
    """The cluster did not answer (a node down, a timeout): worth retrying."""
