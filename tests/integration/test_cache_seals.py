"""Redis cannot forge a decision (shared/seal.py): records planted in the real Redis by
someone other than the service are ignored and counted, whatever they claim."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import TypeAlias

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from cert_service import certcache
from key_service import keyformat
from key_service.verify import encode_record, record_key
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from tests.fixtures.key import RunningKeyService

CertStub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
VALID = key_pb2.VERIFY_RESULT_VALID
REVOKED = key_pb2.VERIFY_RESULT_REVOKED
NOT_FOUND = key_pb2.VERIFY_RESULT_NOT_FOUND


def refused(cache: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "myl_cache_records_refused_total", {"cache": cache, "reason": reason}
        )
        or 0.0
    )


async def verify(service: RunningKeyService, plaintext: str) -> int:
    request = key_pb2.VerifyApiKeyRequest(api_key=plaintext)
    return (await service.stub.VerifyApiKey(request)).result


async def trusted(service: RunningKeyService) -> None:
    """The first guard pass has run (the seal's secret is loaded with it)."""
    while not service.app.verifier.seal.ready:  # noqa: ASYNC110 (no event to wait on)
        await asyncio.sleep(0.01)


async def test_a_planted_valid_record_verifies_neither_a_revoked_nor_a_made_up_key(
    key_service: RunningKeyService, redis_inspect: aioredis.Redis
) -> None:
    await trusted(key_service)
    revoked, row = await key_service.issue_device_key()
    assert await verify(key_service, revoked) == VALID
    genuine = await redis_inspect.get(record_key(row.key_hash))
    assert genuine is not None
    await key_service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
    assert await verify(key_service, revoked) == REVOKED
    forged_before = refused("api_key", "forged")

    # 1. A record in the cache's own format, saying the revoked key is usable for years:
    #    what anyone who can write to Redis and read this code can make.
    usable = dataclasses.replace(row, revoked_at=None)
    await redis_inspect.set(record_key(row.key_hash), encode_record(usable), px=300_000)
    assert await verify(key_service, revoked) == REVOKED
    # 2. The key's own genuine record from before the revocation, replayed.
    await redis_inspect.set(record_key(row.key_hash), genuine, px=300_000)
    # (within its TTL a genuine record is honoured until the guard's replay: see shared/seal.py;
    # once older than the TTL it is refused outright)
    key_service.clock.advance(timedelta(seconds=300 + 61))
    stale_before = refused("api_key", "stale")
    assert await verify(key_service, revoked) in (REVOKED, key_pb2.VERIFY_RESULT_EXPIRED)
    assert refused("api_key", "stale") == stale_before + 1

    # 3. A made-up key, given the genuine record of a live key copied into its slot.
    live, live_row = await key_service.issue_device_key(device_id="device-2")
    assert await verify(key_service, live) == VALID
    copied = await redis_inspect.get(record_key(live_row.key_hash))
    assert copied is not None
    made_up = keyformat.generate()
    await redis_inspect.set(record_key(made_up.key_hash), copied, px=300_000)
    assert await verify(key_service, made_up.plaintext) == NOT_FOUND
    # ...and a crafted one.
    await redis_inspect.set(record_key(made_up.key_hash), encode_record(live_row), px=300_000)
    assert await verify(key_service, made_up.plaintext) == NOT_FOUND

    assert refused("api_key", "forged") == forged_before + 3
    # The live key is untouched by all this.
    assert await verify(key_service, live) == VALID


async def test_a_planted_active_certificate_is_not_served_for_a_revoked_one(
    cert_stub: CertStub, redis_inspect: aioredis.Redis
) -> None:
    await cert_stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id="device-1", uuid_subdomain="sealed")
    )
    get = cert_pb2.GetCertificateRequest(device_id="device-1")
    active = (await cert_stub.GetCertificate(get)).certificate
    assert active.status == cert_pb2.CERTIFICATE_STATUS_ACTIVE
    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="device-1"))
    before = refused("certificate", "forged")

    for key in (certcache.device_key("device-1"), certcache.name_key("sealed.myl.zip")):
        await redis_inspect.set(key, active.SerializeToString(), px=3_600_000)
    assert (await cert_stub.GetCertificate(get)).certificate.status == (
        cert_pb2.CERTIFICATE_STATUS_REVOKED
    )
    lookup = cert_pb2.LookupCertificateRequest(uuid_subdomain="sealed")
    assert (await cert_stub.LookupCertificate(lookup)).certificate.status == (
        cert_pb2.CERTIFICATE_STATUS_REVOKED
    )
    assert refused("certificate", "forged") == before + 2
