"""Redis Cluster: the shared cache, the verify script client and a failover, on a real
3-master cluster (redis-server's own cluster mode, one replica per master).

The services' Redis-facing tests (test_key_verify.py, test_cert_cache.py) also run against
this cluster; here are what only a cluster has: slots moving between nodes and a master dying.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import redis
from redis.asyncio.client import Pipeline
from redis.crc import key_slot

from deploy.devstack.servers import (
    RedisAcl,
    RedisClusterServers,
    RedisServer,
    free_cluster_ports,
)
from key_service import keyformat
from key_service.ratelimit import VERIFY_SCRIPT
from key_service.scriptclient import ClusterScriptClient, Script
from key_service.verify import record_key
from myl.key.v1 import key_pb2
from shared.cache import Cache, cache_key
from shared.config import RedisConfig, ServerConfig
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import start_key_service

R = key_pb2.VerifyApiKeyRequest
VERIFY = Script(VERIFY_SCRIPT)
RECORD = b"99999999999999999|60|99999999999999999|0|"


def config(cluster: RedisClusterServers) -> RedisConfig:
    nodes = tuple((node.host, node.port) for node in cluster.nodes)
    return RedisConfig(cluster_nodes=nodes, socket_timeout=0.5)


def sync_client(node: RedisServer) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port)


async def test_cache_operations_span_slots_on_a_cluster(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flush()
    cache = Cache.from_config(config(redis_cluster))
    keys = [cache_key("test", f"entity-{n}", ":value") for n in range(20)]
    assert len({key_slot(k.encode()) for k in keys}) > 1  # several slots, several masters
    for n, key in enumerate(keys):
        assert await cache.set(key, b"%d" % n, ttl=30)
    assert [await cache.get(key) for key in keys] == [b"%d" % n for n in range(20)]

    def get_all(pipe: Pipeline) -> None:
        for key in keys:
            pipe.get(key)

    results = await cache.pipeline(get_all, default=())
    assert list(results) == [b"%d" % n for n in range(20)]
    assert await cache.delete(*keys)
    assert [await cache.get(key) for key in keys] == [None] * 20
    assert not cache.breaker.is_open
    await cache.close()


def _node_id(node: RedisServer) -> str:
    with sync_client(node) as client:
        reply = client.execute_command("CLUSTER", "MYID")
        return reply.decode() if isinstance(reply, bytes) else str(reply)


async def test_script_client_follows_ask_and_moved_while_a_slot_migrates(
    redis_cluster: RedisClusterServers,
) -> None:
    redis_cluster.flush()
    client = ClusterScriptClient(config(redis_cluster))
    present = ("myl:key:{present}:rec", "myl:key:{present}:rl")
    with sync_client(redis_cluster.master_of(present[0])) as owner:
        owner.set(present[0], RECORD)
    reply = await client.run(VERIFY, present, (b"1", b"1"))
    assert reply[1] == 1  # allowed, from the record we stored

    # Move the slot of a key that does not exist yet to another master, step by step.
    absent = ("myl:key:{absent}:rec", "myl:key:{absent}:rl")
    slot = key_slot(absent[0].encode())
    source = redis_cluster.master_of(absent[0])
    masters = {redis_cluster.master_of(f"probe-{n}").port for n in range(200)}
    target = next(n for n in redis_cluster.nodes if n.port in masters and n.port != source.port)
    source_id, target_id = _node_id(source), _node_id(target)
    with sync_client(target) as t, sync_client(source) as s:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        # Mid-migration, keys missing on the source are asked for on the target (ASK).
        pipe = t.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.set(absent[0], RECORD)
        pipe.execute_command("ASKING")
        pipe.set(absent[1], b"0")  # both keys there: a script over a half-moved slot is TRYAGAIN
        pipe.execute()
    reply = await client.run(VERIFY, absent, (b"1", b"1"))
    assert reply[1] == 1  # answered by the target, after ASKING
    for node in redis_cluster.running():
        if node.port in masters:
            with sync_client(node) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    # The slot now belongs to the target: the client's map says source, the source says MOVED.
    refreshes = client.refreshes
    reply = await client.run(VERIFY, absent, (b"2", b"1"))
    assert reply[1] == 1
    # The MOVED reply started a re-read of the map in the background: wait for it to end.
    refreshing = client._refreshing
    assert refreshing is not None
    async with asyncio.timeout(10):
        await refreshing
    assert client.refreshes > refreshes
    assert client._slots[slot] == (target.host, target.port)
    await client.close()


async def test_verification_follows_a_master_failover_and_never_answers_a_revoked_key(
    make_config: Callable[..., ServerConfig],
    key_clock: FakeClock,
    redis_cluster: RedisClusterServers,
) -> None:
    environ = {
        "REDIS_CLUSTER_NODES": redis_cluster.addresses,
        "REDIS_BREAKER_RESET": "0.1",
        "REDIS_INVALIDATION_INTERVAL": "0.1",
    }
    service = await start_key_service(make_config("key_service", **environ), key_clock)
    try:
        revoked, revoked_row = await service.issue_device_key()
        live, _ = await service.issue_device_key()
        assert (await service.stub.VerifyApiKey(R(api_key=revoked))).result == (
            key_pb2.VERIFY_RESULT_VALID
        )
        await service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(revoked_row.id)))

        # The master holding the revoked key's record dies; its replica takes over.
        master = redis_cluster.master_of(record_key(keyformat.hash_key(revoked)))
        assert master.process is not None
        os.killpg(master.process.pid, signal.SIGKILL)
        master.process.wait()
        master.process = None
        answers: list[int] = []
        live_answers: list[int] = []
        for _ in range(60):  # about 6 s, through detection, election and recovery
            answers.append((await service.stub.VerifyApiKey(R(api_key=revoked))).result)
            reply = await service.stub.VerifyApiKey(R(api_key=live, dry_run=True))
            live_answers.append(reply.result)
            await asyncio.sleep(0.1)
        assert set(answers) == {key_pb2.VERIFY_RESULT_REVOKED}
        assert set(live_answers) == {key_pb2.VERIFY_RESULT_VALID}
        redis_cluster.wait_ok()
        # Served from the cluster again (the circuit closed), by the promoted replica.
        for _ in range(100):
            if not service.app.cache.breaker.is_open:
                break
            await asyncio.sleep(0.05)
        assert not service.app.cache.breaker.is_open
        assert (await service.stub.VerifyApiKey(R(api_key=live))).result == (
            key_pb2.VERIFY_RESULT_VALID
        )
        assert redis_cluster.master_of(record_key(keyformat.hash_key(revoked))) is not master
    finally:
        await service.stop()
        # Bring the dead node back as a replica, so later tests see a full cluster.
        master.start()
        redis_cluster.wait_ok()


def test_a_cluster_starts_again_in_its_directory_after_a_stop(tmp_path: Path) -> None:
    """`REDIS_CLUSTER=1 make run` a second time: each node's `nodes.conf` still names the
    first cluster, and `--cluster create` refuses a node that is not empty; the nodes are
    made one new cluster again, with the ACL users of the first start."""
    ports = free_cluster_ports(6)
    acl = RedisAcl(tmp_path / "users")
    cluster = RedisClusterServers(tmp_path / "cluster", ports, acl=acl)
    try:
        cluster.start()
        assert all((node.directory / "nodes.conf").exists() for node in cluster.nodes)
        cluster.stop()
        cluster.start()
        node = cluster.nodes[0]
        client = redis.Redis(
            host=node.host, port=node.port, username="admin", password=acl.passwords["admin"]
        )
        try:
            info = client.cluster("INFO")
            assert info["cluster_state"] == "ok", info
            assert int(info["cluster_known_nodes"]) == 6, info
        finally:
            client.close()
    finally:
        cluster.stop()
