"""AIP-155 replays against state that moved on, and duplicates that run at the same time.

The rule (shared/idempotency.py): a retry returns the first attempt's recorded outcome and
never creates, revives or extends a credential the current state would refuse; a duplicate
that arrives while another attempt runs gets ABORTED with retry advice, never a second
execution and never INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2  # type: ignore[attr-defined]

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from tests.fixtures import internal_tls
from tests.fixtures.cert import (
    RunningCertService,
    StartCertService,
    error_reason,
    make_csr,
    rpc_status,
)
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService, start_key_service

P = cert_pb2.ProvisionCertificateRequest
VALID = key_pb2.VERIFY_RESULT_VALID
ACTIVE = key_pb2.API_KEY_STATUS_ACTIVE
CONCURRENT = 20
T = TypeVar("T")


def new_id() -> str:
    return str(uuid.uuid4())


async def refused(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), error_reason(caught.value)


def superseded() -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_SUPERSEDED"


async def verify(key_service: RunningKeyService, plaintext: str) -> int:
    reply = await key_service.stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
    return reply.result


async def active_keys(key_service: RunningKeyService, device_id: str) -> list[str]:
    reply = await key_service.stub.ListApiKeys(key_pb2.ListApiKeysRequest(device_id=device_id))
    return sorted(k.key_id for k in reply.keys if k.status == ACTIVE)


async def all_keys(key_service: RunningKeyService, device_id: str) -> int:
    reply = await key_service.stub.ListApiKeys(
        key_pb2.ListApiKeysRequest(device_id=device_id, show_inactive=True, page_size=1000)
    )
    return len(reply.keys)


async def provisioned(
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub, device_id: str
) -> cert_pb2.Certificate:
    return (await cert_stub.ProvisionCertificate(P(device_id=device_id))).certificate


def generate(device_id: str, request_id: str, **fields: object) -> key_pb2.GenerateApiKeyRequest:
    return key_pb2.GenerateApiKeyRequest(
        device_id=device_id,
        device_name="replayed",
        request_id=request_id,
        **fields,  # type: ignore[arg-type]
    )


def rotate(key_id: str, request_id: str, grace: int = 3600) -> key_pb2.RotateApiKeyRequest:
    return key_pb2.RotateApiKeyRequest(
        key_id=key_id,
        grace_period=duration_pb2.Duration(seconds=grace),
        request_id=request_id,
    )


# -- GenerateApiKey and RotateApiKey ---------------------------------------------------------


async def test_a_generate_replayed_after_its_key_was_revoked_hands_out_no_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "revoked-gen")
    request = generate("revoked-gen", new_id())
    first = await key_service.stub.GenerateApiKey(request)
    await key_service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=first.key.key_id))

    assert await refused(key_service.stub.GenerateApiKey(request)) == superseded()
    assert await active_keys(key_service, "revoked-gen") == []
    assert await all_keys(key_service, "revoked-gen") == 1


async def test_a_rotate_replayed_after_both_keys_were_revoked_hands_out_no_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "revoked-rot")
    old = await key_service.stub.GenerateApiKey(generate("revoked-rot", ""))
    request = rotate(old.key.key_id, new_id())
    rotated = await key_service.stub.RotateApiKey(request)
    for key_id in (old.key.key_id, rotated.key.key_id):
        await key_service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=key_id))

    assert await refused(key_service.stub.RotateApiKey(request)) == superseded()
    assert await active_keys(key_service, "revoked-rot") == []
    assert await all_keys(key_service, "revoked-rot") == 2
    assert await verify(key_service, rotated.api_key) == key_pb2.VERIFY_RESULT_REVOKED


async def test_replays_after_a_device_wide_revocation_hand_out_no_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "revoked-all")
    generated = generate("revoked-all", new_id())
    key = await key_service.stub.GenerateApiKey(generated)
    rotation = rotate(key.key.key_id, new_id())
    await key_service.stub.RotateApiKey(rotation)
    await key_service.stub.RevokeDeviceApiKeys(
        key_pb2.RevokeDeviceApiKeysRequest(device_id="revoked-all", reason="lost")
    )

    assert await refused(key_service.stub.GenerateApiKey(generated)) == superseded()
    assert await refused(key_service.stub.RotateApiKey(rotation)) == superseded()
    assert await active_keys(key_service, "revoked-all") == []


async def test_a_rotate_replayed_after_the_device_was_deleted_gives_the_new_device_no_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "reborn")
    old = await key_service.stub.GenerateApiKey(generate("reborn", ""))
    request = rotate(old.key.key_id, new_id())
    await key_service.stub.RotateApiKey(request)
    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="reborn"))
    # A new device under the same id (provisioning waits until the old keys are revoked).
    await provisioned(cert_stub, "reborn")

    assert await refused(key_service.stub.RotateApiKey(request)) == superseded()
    assert await active_keys(key_service, "reborn") == []


async def test_a_generate_replayed_after_its_key_expired_is_superseded(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "short-lived")
    expiry = timestamp_pb2.Timestamp()
    expiry.FromDatetime(key_service.clock.now() + timedelta(hours=1))
    request = generate("short-lived", new_id(), expire_time=expiry)
    await key_service.stub.GenerateApiKey(request)
    key_service.clock.advance(hours=2)

    # Not INVALID_ARGUMENT for an expire_time now in the past: the request was valid.
    assert await refused(key_service.stub.GenerateApiKey(request)) == superseded()
    assert await active_keys(key_service, "short-lived") == []


async def test_a_replay_of_a_live_key_replaces_it_without_extending_it(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "extended")
    request = generate("extended", new_id())
    first = await key_service.stub.GenerateApiKey(request)
    key_service.clock.advance(hours=20)
    again = await key_service.stub.GenerateApiKey(request)
    assert again.key.expire_time == first.key.expire_time
    assert [await verify(key_service, first.api_key), await verify(key_service, again.api_key)] == [
        key_pb2.VERIFY_RESULT_REVOKED,
        VALID,
    ]

    rotation = rotate(again.key.key_id, new_id())
    rotated = await key_service.stub.RotateApiKey(rotation)
    key_service.clock.advance(hours=3)
    rotated_again = await key_service.stub.RotateApiKey(rotation)
    assert rotated_again.key.expire_time == rotated.key.expire_time
    assert await verify(key_service, rotated_again.api_key) == VALID


async def test_a_rotate_replayed_after_its_key_was_rotated_again_is_superseded(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "twice-rotated")
    old = await key_service.stub.GenerateApiKey(generate("twice-rotated", ""))
    request = rotate(old.key.key_id, new_id())
    second = await key_service.stub.RotateApiKey(request)
    third = await key_service.stub.RotateApiKey(rotate(second.key.key_id, new_id(), grace=0))

    assert await refused(key_service.stub.RotateApiKey(request)) == superseded()
    assert await active_keys(key_service, "twice-rotated") == sorted(
        [old.key.key_id, third.key.key_id]  # the first key is still in its grace period
    )


# -- RevokeApiKey and RevokeDeviceApiKeys ----------------------------------------------------


async def test_revokes_replayed_return_the_first_outcome_and_revoke_nothing_new(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "revokes")
    one = await key_service.stub.GenerateApiKey(generate("revokes", ""))
    revoke = key_pb2.RevokeApiKeyRequest(key_id=one.key.key_id, reason="first", request_id=new_id())
    first = await key_service.stub.RevokeApiKey(revoke)
    again = await key_service.stub.RevokeApiKey(revoke)
    assert again.key.revoke_time == first.key.revoke_time
    assert again.key.revocation_reason == "first"

    await key_service.stub.GenerateApiKey(generate("revokes", ""))
    all_of_them = key_pb2.RevokeDeviceApiKeysRequest(device_id="revokes", request_id=new_id())
    assert (await key_service.stub.RevokeDeviceApiKeys(all_of_them)).revoked_count == 1
    newer = await key_service.stub.GenerateApiKey(generate("revokes", ""))
    assert (await key_service.stub.RevokeDeviceApiKeys(all_of_them)).revoked_count == 1
    assert await active_keys(key_service, "revokes") == [newer.key.key_id]
    assert await verify(key_service, newer.api_key) == VALID

    other = key_pb2.RevokeDeviceApiKeysRequest(
        device_id="revokes", reason="other", request_id=all_of_them.request_id
    )
    code, _ = await refused(key_service.stub.RevokeDeviceApiKeys(other))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- ProvisionCertificate, RenewCertificate, RevokeCertificate, DeleteDevice -----------------


async def test_a_provision_replayed_after_revoke_renewal_or_deletion_reactivates_nothing(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,  # receives the deletions' cascade
) -> None:
    revoked = P(device_id="prov-revoked", request_id=new_id())
    await cert_stub.ProvisionCertificate(revoked)
    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="prov-revoked"))
    assert await refused(cert_stub.ProvisionCertificate(revoked)) == superseded()
    current = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="prov-revoked")
    )
    assert current.certificate.status == cert_pb2.CERTIFICATE_STATUS_REVOKED

    with_csr = P(
        device_id="prov-renewed",
        uuid_subdomain="prov-renewed",
        csr_pem=make_csr(["prov-renewed.myl.zip", "*.prov-renewed.myl.zip"]),
        request_id=new_id(),
    )
    await cert_stub.ProvisionCertificate(with_csr)
    renewed = await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(device_id="prov-renewed")
    )
    assert await refused(cert_stub.ProvisionCertificate(with_csr)) == superseded()
    current = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="prov-renewed")
    )
    assert current.certificate.serial_number == renewed.certificate.serial_number

    deleted = P(device_id="prov-deleted", request_id=new_id())
    await cert_stub.ProvisionCertificate(deleted)
    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="prov-deleted"))
    assert await refused(cert_stub.ProvisionCertificate(deleted)) == superseded()
    code, _ = await refused(
        cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="prov-deleted"))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # Provisioned again by another request: the replay still creates or replaces nothing.
    again = await provisioned(cert_stub, "prov-deleted")
    assert await refused(cert_stub.ProvisionCertificate(deleted)) == superseded()
    current = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="prov-deleted")
    )
    assert current.certificate.serial_number == again.serial_number


async def test_a_provision_replayed_while_live_is_never_valid_for_longer(
    cert_service: RunningCertService, cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub
) -> None:
    request = P(device_id="prov-live", request_id=new_id())
    first = await cert_stub.ProvisionCertificate(request)
    cert_service.clock.advance(hours=20)
    again = await cert_stub.ProvisionCertificate(request)
    assert again.private_key_pem
    assert again.private_key_pem != first.private_key_pem
    assert again.certificate.serial_number != first.certificate.serial_number
    assert again.certificate.not_after.seconds <= first.certificate.not_after.seconds


async def test_a_renewal_replayed_after_the_certificate_moved_on_is_superseded(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,  # receives the deletions' cascade
) -> None:
    for device_id in ("renew-revoked", "renew-renewed", "renew-deleted"):
        await provisioned(cert_stub, device_id)

    revoked = cert_pb2.RenewCertificateRequest(device_id="renew-revoked", request_id=new_id())
    await cert_stub.RenewCertificate(revoked)
    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="renew-revoked"))
    assert await refused(cert_stub.RenewCertificate(revoked)) == superseded()

    renewed = cert_pb2.RenewCertificateRequest(device_id="renew-renewed", request_id=new_id())
    await cert_stub.RenewCertificate(renewed)
    later = await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(device_id="renew-renewed")
    )
    assert await refused(cert_stub.RenewCertificate(renewed)) == superseded()
    current = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="renew-renewed")
    )
    assert current.certificate.serial_number == later.certificate.serial_number
    assert current.certificate.renewal_count == 2

    deleted = cert_pb2.RenewCertificateRequest(device_id="renew-deleted", request_id=new_id())
    await cert_stub.RenewCertificate(deleted)
    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="renew-deleted"))
    assert await refused(cert_stub.RenewCertificate(deleted)) == superseded()
    await provisioned(cert_stub, "renew-deleted")
    assert await refused(cert_stub.RenewCertificate(deleted)) == superseded()


async def test_revoke_and_delete_replayed_act_on_nothing_that_came_after(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,  # receives the deletions' cascade
) -> None:
    await cert_stub.ProvisionCertificate(
        P(device_id="revoke-replayed", uuid_subdomain="revoke-replayed")
    )
    revoke = cert_pb2.RevokeCertificateRequest(
        device_id="revoke-replayed",
        reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE,
        request_id=new_id(),
    )
    first = await cert_stub.RevokeCertificate(revoke)
    again = await cert_stub.RevokeCertificate(revoke)
    assert again.certificate.serial_number == first.certificate.serial_number
    renewed = await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(
            device_id="revoke-replayed",
            csr_pem=make_csr(["revoke-replayed.myl.zip", "*.revoke-replayed.myl.zip"]),
        )
    )
    assert await refused(cert_stub.RevokeCertificate(revoke)) == superseded()
    current = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="revoke-replayed")
    )
    assert current.certificate.serial_number == renewed.certificate.serial_number
    assert current.certificate.status == cert_pb2.CERTIFICATE_STATUS_ACTIVE

    await provisioned(cert_stub, "delete-replayed")
    delete = cert_pb2.DeleteDeviceRequest(device_id="delete-replayed", request_id=new_id())
    await cert_stub.DeleteDevice(delete)
    again_provisioned = await provisioned(cert_stub, "delete-replayed")
    await cert_stub.DeleteDevice(delete)  # OK: the first outcome; the new device stays
    current = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="delete-replayed")
    )
    assert current.certificate.serial_number == again_provisioned.serial_number


# -- duplicates at the same time -------------------------------------------------------------


def in_progress(error: grpc.aio.AioRpcError) -> bool:
    """ABORTED with ErrorInfo REQUEST_IN_PROGRESS and a RetryInfo: retry with the same id."""
    status = rpc_status(error)
    retry = [
        info
        for detail in (status.details if status is not None else ())
        if detail.Unpack(info := error_details_pb2.RetryInfo())
    ]
    return (
        error.code() == grpc.StatusCode.ABORTED
        and error_reason(error) == "REQUEST_IN_PROGRESS"
        and "retry with the same request_id" in (error.details() or "")
        and len(retry) == 1
    )


async def burst(*calls: Callable[[], Awaitable[T]]) -> tuple[list[T], int]:
    """CONCURRENT calls at once (taking turns among `calls`, e.g. one per replica): the
    answers, and how many were ABORTED in progress. Any other error fails the test."""
    results = await asyncio.gather(
        *(calls[i % len(calls)]() for i in range(CONCURRENT)), return_exceptions=True
    )
    answers: list[T] = []
    aborted = 0
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError) and in_progress(result):
            aborted += 1
        elif isinstance(result, BaseException):
            raise result
        else:
            answers.append(result)
    assert answers, "no attempt succeeded"
    return answers, aborted


async def test_concurrent_rotations_with_one_request_id_rotate_once(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "rotate-burst")
    old = await key_service.stub.GenerateApiKey(generate("rotate-burst", ""))
    request = rotate(old.key.key_id, new_id())

    answers, aborted = await burst(lambda: key_service.stub.RotateApiKey(request))
    print(f"{len(answers)} answered, {aborted} ABORTED in progress")
    assert {a.key.rotated_from_key_id for a in answers} == {old.key.key_id}
    events = await key_service.stub.ListAuditEvents(
        key_pb2.ListAuditEventsRequest(key_id=old.key.key_id)
    )
    rotations = [e for e in events.events if e.action == key_pb2.AUDIT_ACTION_ROTATE]
    assert len(rotations) == 1
    # One request id names one working key: the last answer's (earlier answers were
    # superseded by the retries that came after them).
    results = [await verify(key_service, a.api_key) for a in answers]
    assert results.count(VALID) == 1
    assert len(await active_keys(key_service, "rotate-burst")) == 2  # old (grace) + one new

    retried = await key_service.stub.RotateApiKey(request)
    assert retried.key.rotated_from_key_id == old.key.key_id
    assert await verify(key_service, retried.api_key) == VALID
    assert len(await active_keys(key_service, "rotate-burst")) == 2


async def test_concurrent_generates_with_one_request_id_leave_one_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "generate-burst")
    request = generate("generate-burst", new_id())
    answers, _ = await burst(lambda: key_service.stub.GenerateApiKey(request))
    results = [await verify(key_service, a.api_key) for a in answers]
    assert results.count(VALID) == 1
    assert len(await active_keys(key_service, "generate-burst")) == 1


async def test_concurrent_device_revocations_with_one_request_id_agree(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await provisioned(cert_stub, "revoke-burst")
    for _ in range(3):
        await key_service.stub.GenerateApiKey(generate("revoke-burst", ""))
    request = key_pb2.RevokeDeviceApiKeysRequest(device_id="revoke-burst", request_id=new_id())
    answers, _ = await burst(lambda: key_service.stub.RevokeDeviceApiKeys(request))
    assert {a.revoked_count for a in answers} == {3}


async def test_concurrent_certificate_requests_with_one_request_id_execute_once(
    cert_service: RunningCertService, cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub
) -> None:
    names = ["burst.myl.zip", "*.burst.myl.zip"]
    provision = P(
        device_id="burst", uuid_subdomain="burst", csr_pem=make_csr(names), request_id=new_id()
    )
    provisions, _ = await burst(lambda: cert_stub.ProvisionCertificate(provision))
    assert len({p.certificate.serial_number for p in provisions}) == 1

    renew = cert_pb2.RenewCertificateRequest(device_id="burst", request_id=new_id())
    renewals, _ = await burst(lambda: cert_stub.RenewCertificate(renew))
    assert {r.certificate.renewal_count for r in renewals} == {1}
    assert len({r.certificate.serial_number for r in renewals}) == 1

    revoke = cert_pb2.RevokeCertificateRequest(device_id="burst", request_id=new_id())
    revocations, _ = await burst(lambda: cert_stub.RevokeCertificate(revoke))
    assert {r.certificate.serial_number for r in revocations} == {
        renewals[0].certificate.serial_number
    }

    delete = cert_pb2.DeleteDeviceRequest(device_id="burst", request_id=new_id())
    await burst(lambda: cert_stub.DeleteDevice(delete))  # all OK or ABORTED, no NOT_FOUND
    code, _ = await refused(
        cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="burst"))
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_duplicates_spread_over_replicas_still_execute_once(
    start_cert_service: StartCertService,
    make_config: Callable[..., ServerConfig],
) -> None:
    # Each replica turns away a duplicate of what it is serving itself; between replicas
    # the database decides (an advisory lock on the request id, a unique request key).
    certs = [await start_cert_service(), await start_cert_service()]
    config = make_config("key_service", PORT=str(certs[0].key_service_port))
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0), frozen=True)
    keys = [
        await start_key_service(config, clock, cert_address=certs[0].address),
        await start_key_service(
            make_config("key_service", PORT="0"), clock, cert_address=certs[1].address
        ),
    ]
    channels = [internal_tls.channel(c.address) for c in certs]
    try:
        cert_stubs = [cert_pb2_grpc.CertificateServiceStub(c) for c in channels]
        await cert_stubs[0].ProvisionCertificate(P(device_id="replicated"))
        old = await keys[0].stub.GenerateApiKey(generate("replicated", ""))
        rotation = rotate(old.key.key_id, new_id())
        rotations, _ = await burst(*(lambda k=k: k.stub.RotateApiKey(rotation) for k in keys))
        events = await keys[0].stub.ListAuditEvents(
            key_pb2.ListAuditEventsRequest(key_id=old.key.key_id)
        )
        assert [e.action for e in events.events].count(key_pb2.AUDIT_ACTION_ROTATE) == 1
        results = [await verify(keys[0], r.api_key) for r in rotations]
        assert results.count(VALID) == 1
        assert len(await active_keys(keys[0], "replicated")) == 2

        renew = cert_pb2.RenewCertificateRequest(device_id="replicated", request_id=new_id())
        renewals, _ = await burst(*(lambda s=s: s.RenewCertificate(renew) for s in cert_stubs))
        assert {r.certificate.renewal_count for r in renewals} == {1}

        revoke_all = key_pb2.RevokeDeviceApiKeysRequest(device_id="replicated", request_id=new_id())
        revocations, _ = await burst(
            *(lambda k=k: k.stub.RevokeDeviceApiKeys(revoke_all) for k in keys)
        )
        assert {r.revoked_count for r in revocations} == {2}

        delete = cert_pb2.DeleteDeviceRequest(device_id="replicated", request_id=new_id())
        await burst(*(lambda s=s: s.DeleteDevice(delete) for s in cert_stubs))
    finally:
        for channel in channels:
            await channel.close(None)
        for key in keys:
            await key.stop()
