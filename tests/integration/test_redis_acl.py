"""Redis as `make run` sets it up (deploy/devstack/servers.py `RedisAcl`): no default user,
one ACL user per service with its own keys and the commands it needs, and the services
working through those users against the real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deploy.devstack.servers import RedisAcl, RedisServer, free_port
from key_service import keyformat
from key_service.verify import record_key
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from tests.fixtures import gateway_identity
from tests.fixtures.cert import StartCertService
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import start_key_service


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisAcl]]:
    directory: Path = tmp_path_factory.mktemp("redis-acl")
    acl = RedisAcl(directory / "users")
    server = RedisServer(directory / "redis", free_port(), acl=acl)
    server.start()
    try:
        yield server, acl
    finally:
        server.stop()


# redis-py retries a refused login (an AuthenticationError is a ConnectionError) with
# seconds of back-off by default; the services' clients do not retry it (shared/cache.py).
NO_RETRY = Retry(NoBackoff(), 0)


def login(server: RedisServer, acl: RedisAcl | None, user: str | None) -> redis.Redis:
    password = acl.passwords[user] if acl is not None and user is not None else None
    return redis.Redis(
        host=server.host, port=server.port, username=user, password=password, retry=NO_RETRY
    )


def test_a_connection_that_did_not_log_in_can_do_nothing(
    acl_redis: tuple[RedisServer, RedisAcl],
) -> None:
    server, _ = acl_redis
    with login(server, None, None) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.set("myl:key:{x}:rec", b"VALID")
    wrong = redis.Redis(
        host=server.host,
        port=server.port,
        username="key_service",
        password="guess",
        retry=NO_RETRY,
    )
    with wrong, pytest.raises(redis.AuthenticationError):
        wrong.ping()
    # The ACL file holds digests, never a password.
    acl_file = (server.directory / "users.acl").read_text()
    assert all(password not in acl_file for password in acl_redis[1].passwords.values())


@pytest.mark.parametrize(
    ("user", "own", "other"),
    [
        ("key_service", "myl:key:{h}:rec", "myl:cert:{device-1}:device"),
        ("cert_service", "myl:cert:{device-1}:device", "myl:key:{h}:rec"),
    ],
)
def test_each_service_reaches_only_its_own_keys_and_no_admin_command(
    acl_redis: tuple[RedisServer, RedisAcl], user: str, own: str, other: str
) -> None:
    server, acl = acl_redis
    with login(server, acl, user) as client:
        client.set(own, b"x", px=1000)
        assert client.get(own) == b"x"
        assert client.eval("return redis.call('GET', KEYS[1])", 1, own) == b"x"
        client.set("myl:limit:{NewDevicesPerOperatorKey:k}", b"1", px=1000)  # shared limits
        assert "redis_version" in client.info("server")
        refusals: tuple[Callable[[], object], ...] = (
            lambda: client.set(other, b"forged"),
            lambda: client.get(other),
            lambda: client.eval("return redis.call('SET', KEYS[1], 'x')", 1, other),
            lambda: client.flushall(),
            lambda: client.config_get("maxmemory-policy"),
            lambda: client.keys("*"),
        )
        for refused in refusals:
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()


async def test_both_services_work_through_their_own_users(
    acl_redis: tuple[RedisServer, RedisAcl],
    make_config: Callable[..., ServerConfig],
    key_clock: FakeClock,
    start_cert_service: StartCertService,
) -> None:
    server, acl = acl_redis
    where = {"REDIS_HOST": server.host, "REDIS_PORT": str(server.port)}
    key_env = {
        **where,
        "REDIS_USERNAME": "key_service",
        "REDIS_PASSWORD": acl.passwords["key_service"],
    }
    service = await start_key_service(make_config("key_service", **key_env), key_clock)
    admin = aioredis.Redis(
        host=server.host, port=server.port, username="admin", password=acl.passwords["admin"]
    )
    try:
        plaintext, row = await service.issue_device_key()
        verify = key_pb2.VerifyApiKeyRequest(api_key=plaintext)
        for _ in range(3):
            assert (await service.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_VALID
        assert await admin.exists(record_key(keyformat.hash_key(plaintext)))  # cached in Redis
        assert service.app.cache.breaker.is_open is False
        await service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
        assert (await service.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_REVOKED
    finally:
        await service.stop()

    cert_env = {
        **where, "REDIS_USERNAME": "cert_service", "REDIS_PASSWORD": acl.passwords["cert_service"],
    }  # fmt: skip
    cert = await start_cert_service(**cert_env)
    try:
        async with gateway_identity.channel(cert.address) as channel:
            stub = cert_pb2_grpc.CertificateServiceStub(channel)
            await stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id="acl-device", uuid_subdomain="acl")
            )
            get = cert_pb2.GetCertificateRequest(device_id="acl-device")
            got = await stub.GetCertificate(get)
        assert got.certificate.status == cert_pb2.CERTIFICATE_STATUS_ACTIVE
        assert await admin.exists("myl:cert:{acl-device}:device")
    finally:
        await admin.aclose()
