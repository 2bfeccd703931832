"""A lean Redis client for the verify hot path: pipelined EVALSHA on one connection.

redis-py's asyncio client costs tens of microseconds per command in Python
(a pooled connection checked out and back, a task per read for the socket
timeout). Verification runs one script per request, so this client keeps a
single connection and matches replies to callers in order, parsing with
hiredis. Writes are batched (automatic pipelining): a call made while no
earlier batch awaits its replies is written at the end of the current
event-loop iteration, together with any other call made in it; calls made
while a batch is out wait for its last reply and then go out as one `write`.
An idle client thus adds no delay, and a busy one sends fewer, larger
writes (fewer syscalls here and in Redis). The command header (`*N`,
`EVALSHA`, the SHA, the key count) is encoded once per script and shape.
Redis answers in order, so a reply that is late means every later one is
too: one timer per connection, not per call, enforces the timeout.

Failures raise redis-py's `ConnectionError` / `TimeoutError` / `ResponseError`,
so `shared.cache.Cache.run` (its circuit breaker and default) treats them like
any other Redis failure. Everything else (writes, invalidation) goes through
the shared `Cache`.

Why it is hand-written at all: `make bench` (tests/bench/bench_redis_clients.py)
runs the verify script through this client, redis-py's asyncio client (hiredis)
and valkey-glide, on standalone Redis and on a cluster. With 200 concurrent
callers in one process this client made 5 to 10 times redis-py's calls per
second on both (figures in docs/key_service.md). On Redis Cluster,
`ClusterScriptClient` routes each call by the hash slot of its first key (every
key of one call shares a hash tag), one pipelined connection per node, follows
`MOVED` (and refreshes the slot map from `CLUSTER SLOTS`) and `ASK` (with
`ASKING`), and refreshes the map after a node stops answering, so a failover is
followed once the cluster has promoted a replica.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, Protocol

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import RedisConfig


def pack(*parts: bytes) -> bytes:
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outgoing: list[bytes] = []
        # Requests written whose replies have not all arrived; while any are,
        # new requests wait for them and then go out together.
        self.in_flight = 0
        self.flush_scheduled = False
        self.closed = False
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        pending = self.pending
        reader.feed(data)
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    break
                future = pending.popleft()[0]
                self.in_flight -= 1
                if not future.done():
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self._fail(RedisConnectionError(f"unexpected data from Redis: {exc}"))
            return
        if self.in_flight <= 0 and self.outgoing and not self.flush_scheduled:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("connection to Redis lost"))

    def request(self, payload: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise RedisConnectionError("connection to Redis closed")
        future = self.loop.create_future()
        self.pending.append((future, self.loop.time()))
        self.outgoing.append(payload)
        if not self.in_flight and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self.timeout, self._check_timeout)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        outgoing = self.outgoing
        if not outgoing or self.transport is None or self.closed:
            return
        self.outgoing = []
        self.in_flight += len(outgoing)
        self.transport.write(b"".join(outgoing))

    def _check_timeout(self) -> None:
        self._watchdog = None
        if not self.pending:
            return
        waited = self.loop.time() - self.pending[0][1]
        if waited >= self.timeout:
            self._fail(RedisTimeoutError(f"Redis did not answer within {self.timeout:g}s"))
        else:
            self._watchdog = self.loop.call_later(self.timeout - waited, self._check_timeout)

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._fail(RedisConnectionError("closed"))


async def _connect(config: RedisConfig, host: str, port: int, *, select: bool) -> _Connection:
    loop = asyncio.get_running_loop()
    timeout = config.socket_timeout
    try:
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(timeout), host, port), timeout
        )
    except (TimeoutError, OSError) as exc:
        raise RedisConnectionError(f"cannot connect to Redis at {host}:{port}: {exc}") from None
    setup = []
    if config.username:
        setup.append(pack(b"AUTH", config.username.encode(), config.password.encode()))
    elif config.password:
        setup.append(pack(b"AUTH", config.password.encode()))
    if select and config.db:
        setup.append(pack(b"SELECT", str(config.db).encode()))
    for command in setup:
        reply = await connection.request(command)
        if isinstance(reply, hiredis.ReplyError):
            connection.close()
            raise RedisConnectionError(f"Redis refused the connection: {reply}")
    return connection


class ScriptRunner(Protocol):
    """What the verify hot path needs: run a script, by SHA, with keys of one hash tag."""

    async def run(
        self, script: Script, keys: Sequence[str | bytes], args: Sequence[bytes]
    ) -> Any: ...

    async def close(self) -> None: ...


def script_client(config: RedisConfig) -> ScriptClient | ClusterScriptClient:
    """The client for `config`: one connection, or one per node of a Redis Cluster."""
    if config.cluster_nodes:
        return ClusterScriptClient(config)
    return ScriptClient(config)


class ScriptClient:
    """Runs Lua scripts by SHA over one pipelined connection (reconnects on demand)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def _connect(self) -> _Connection:
        return await _connect(self.config, self.config.host, self.config.port, select=True)

    async def _get(self) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        task = self._connecting
        try:
            connection = await asyncio.shield(task)
        finally:
            if self._connecting is task and task.done():
                self._connecting = None
        self._connection = connection
        return connection

    async def run(self, script: Script, keys: Sequence[str | bytes], args: Sequence[bytes]) -> Any:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._get()
        tail = _pack_tail(keys, args)
        reply = await connection.request(script.head(b"EVALSHA", len(keys), len(args)) + tail)
        if isinstance(reply, hiredis.ReplyError):
            if not str(reply).startswith("NOSCRIPT"):
                raise ResponseError(str(reply))
            # Redis restarted (or flushed its scripts): EVAL loads the script again.
            reply = await connection.request(script.head(b"EVAL", len(keys), len(args)) + tail)
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
        return reply

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


Node = tuple[str, int]
_MAX_REDIRECTS: Final = 5


class ClusterScriptClient:
    """`ScriptClient` for Redis Cluster: routed by hash slot, following MOVED and ASK."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._startup: list[Node] = list(config.cluster_nodes)
        self._slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._connections: dict[Node, _Connection] = {}
        self._connecting: dict[Node, asyncio.Task[_Connection]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self.refreshes = 0

    async def _connection(self, node: Node) -> _Connection:
        connection = self._connections.get(node)
        if connection is not None and not connection.closed:
            return connection
        task = self._connecting.get(node)
        if task is None:
            task = asyncio.ensure_future(_connect(self.config, *node, select=False))
            self._connecting[node] = task
        try:
            connection = await asyncio.shield(task)
        except RedisConnectionError:
            # A node that does not answer: the slot map may be out of date (a failover).
            self._slots_stale()
            raise
        finally:
            if self._connecting.get(node) is task and task.done():
                del self._connecting[node]
        self._connections[node] = connection
        return connection

    def _slots_stale(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        """Read the slot map from the first node that answers `CLUSTER SLOTS`; when none
        does, keep the old map (the calls routed by it fail and are counted)."""
        known = {node for node in self._slots if node is not None}
        for node in [*known, *self._startup]:
            try:
                connection = await self._connection(node)
                reply = await connection.request(pack(b"CLUSTER", b"SLOTS"))
            except (RedisConnectionError, RedisTimeoutError):
                continue
            if isinstance(reply, hiredis.ReplyError) or not isinstance(reply, list):
                continue
            slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, primary, *_replicas in reply:
                owner = (primary[0].decode(), int(primary[1]))
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = owner
            self._slots = slots
            self.refreshes += 1
            return

    async def _node_for(self, slot: int) -> Node:
        node = self._slots[slot]
        if node is None:
            self._slots_stale()
            assert self._refreshing is not None
            await asyncio.shield(self._refreshing)
            node = self._slots[slot]
            if node is None:
                raise RedisConnectionError(f"no Redis Cluster node serves slot {slot}")
        return node

    async def run(self, script: Script, keys: Sequence[str | bytes], args: Sequence[bytes]) -> Any:
        first = keys[0]
        slot = key_slot(first.encode() if isinstance(first, str) else first)
        node = await self._node_for(slot)
        tail = _pack_tail(keys, args)
        command = b"EVALSHA"
        asking = False
        for _ in range(_MAX_REDIRECTS):
            connection = await self._connection(node)
            payload = script.head(command, len(keys), len(args)) + tail
            try:
                if asking:
                    # ASKING and the command go out together; ASKING's reply is +OK.
                    connection.request(pack(b"ASKING"))
                reply = await connection.request(payload)
            except (RedisConnectionError, RedisTimeoutError):
                self._slots_stale()
                raise
            asking = False
            if not isinstance(reply, hiredis.ReplyError):
                return reply
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                command = b"EVAL"  # this node has not seen the script yet
            elif message.startswith("MOVED"):
                node = _node_of(message)
                self._slots[slot] = node  # this slot now; the rest when the map is read
                self._slots_stale()
            elif message.startswith("ASK"):
                node, asking = _node_of(message), True  # this call only: a slot migrating
            else:
                raise ResponseError(message)  # CLUSTERDOWN, TRYAGAIN, script errors
        raise ResponseError(f"more than {_MAX_REDIRECTS} redirections for slot {slot}")

    async def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()


def _node_of(redirect: str) -> Node:
    """The node of a `MOVED <slot> <host>:<port>` or `ASK ...` reply."""
    address = redirect.split()[2]
    host, _, port = address.rpartition(":")
    return host, int(port)


def _pack_tail(keys: Sequence[str | bytes], args: Sequence[bytes]) -> bytes:
    """The keys and arguments of a script call as RESP bulk strings."""
    out = []
    for key in keys:
        part = key.encode() if isinstance(key, str) else key
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    for part in args:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class Script:
    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        self._heads: dict[tuple[bytes, int, int], bytes] = {}

    def head(self, command: bytes, keys: int, args: int) -> bytes:
        """`*N <command> <sha or source> <numkeys>` in RESP; computed once per shape."""
        shape = (command, keys, args)
        head = self._heads.get(shape)
        if head is None:
            body = self.sha if command == b"EVALSHA" else self.source
            head = b"*%d\r\n" % (3 + keys + args) + pack(command, body, b"%d" % keys)[4:]
            self._heads[shape] = head
        return head
