"""Random requests to every RPC of the running server never end in INTERNAL or UNKNOWN.

Each answer is either OK or a deliberate error; INVALID_ARGUMENT always names the request
field that was refused (a BadRequest violation with the proto field name).
"""

from __future__ import annotations

import base64
import json
from typing import Any, TypeAlias

import grpc
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures.cert import make_csr, violated_fields

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Any text the client can encode: every code point except lone surrogates.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
DEVICE_ID = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,30}", fullmatch=True),
    TEXT,
    st.just("x" * 129),
)
NAME = st.one_of(
    LABEL,
    LABEL.map(lambda label: f"{label}.myl.zip"),
    st.tuples(LABEL, LABEL).map(lambda p: f"{p[0]}.{p[1]}.myl.zip"),
    st.sampled_from(["www", "*.x.myl.zip", "myl.zip", "a..myl.zip", "x.example.com", "-a-"]),
    TEXT,
)
_P256 = ec.generate_private_key(ec.SECP256R1())
CSR = st.one_of(
    st.just(""),
    TEXT,
    st.sampled_from(
        [
            make_csr(),
            make_csr(["other.myl.zip"]),
            make_csr([], ec.generate_private_key(ec.SECP521R1())),
            make_csr([], rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            make_csr([], _P256)[:-40],
            make_csr([], _P256).replace("A", "B", 3),
            make_csr([], _P256) + "\x00",
            "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
        ]
    ),
)
TIMESTAMP = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    nanos=INT32,
)
PAGE_TOKEN = st.one_of(
    TEXT,
    st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.fixed_dictionaries(
        {"t": st.one_of(st.integers(), TEXT), "d": st.one_of(TEXT, st.integers()), "q": TEXT}
    ).map(lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")),
)


async def outcome(stub: Stub, method: str, request: Message) -> grpc.aio.AioRpcError | None:
    try:
        await getattr(stub, method)(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def call(stub: Stub, method: str, request: Message) -> None:
    error = await outcome(stub, method, request)
    if error is None:
        return
    assert error.code() not in FORBIDDEN, (method, request, error.details())
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        fields = violated_fields(error)
        assert fields, (method, request)
        assert set(fields) <= set(request.DESCRIPTOR.fields_by_name), fields


@SETTINGS
@given(
    device_id=DEVICE_ID,
    name=st.one_of(st.just(""), NAME),
    certificate_type=st.one_of(st.sampled_from([0, 1, 2]), INT32),
    csr_pem=CSR,
    auto_renewal=st.one_of(st.none(), st.booleans()),
    validity_days=st.one_of(st.integers(min_value=-2, max_value=830), INT32),
)
async def test_provision(
    cert_stub: Stub,
    device_id: str,
    name: str,
    certificate_type: int,
    csr_pem: str,
    auto_renewal: bool | None,
    validity_days: int,
) -> None:
    fields: dict[str, Any] = {}
    if auto_renewal is not None:
        fields["auto_renewal"] = auto_renewal
    request = cert_pb2.ProvisionCertificateRequest(
        device_id=device_id,
        uuid_subdomain=name,
        certificate_type=certificate_type,  # type: ignore[arg-type]
        csr_pem=csr_pem,
        validity_days=validity_days,
        **fields,
    )
    await call(cert_stub, "ProvisionCertificate", request)


@SETTINGS
@given(device_id=DEVICE_ID)
async def test_get_and_delete(cert_stub: Stub, device_id: str) -> None:
    await call(cert_stub, "GetCertificate", cert_pb2.GetCertificateRequest(device_id=device_id))
    await call(cert_stub, "DeleteDevice", cert_pb2.DeleteDeviceRequest(device_id=device_id))


@SETTINGS
@given(name=NAME)
async def test_lookup(cert_stub: Stub, name: str) -> None:
    request = cert_pb2.LookupCertificateRequest(uuid_subdomain=name)
    await call(cert_stub, "LookupCertificate", request)


@SETTINGS
@given(
    page_size=st.one_of(st.integers(min_value=-2, max_value=1100), INT32),
    page_token=st.one_of(st.just(""), PAGE_TOKEN),
    status=st.one_of(st.sampled_from([0, 1, 2, 3]), INT32),
    expire_before=st.one_of(st.none(), TIMESTAMP),
)
async def test_list(
    cert_stub: Stub,
    page_size: int,
    page_token: str,
    status: int,
    expire_before: timestamp_pb2.Timestamp | None,
) -> None:
    request = cert_pb2.ListCertificatesRequest(
        page_size=page_size,
        page_token=page_token,
        status=status,  # type: ignore[arg-type]
    )
    if expire_before is not None:
        request.expire_before.CopyFrom(expire_before)
    await call(cert_stub, "ListCertificates", request)


@SETTINGS
@given(device_id=DEVICE_ID, csr_pem=CSR, reason=st.one_of(st.sampled_from(range(5)), INT32))
async def test_renew_and_revoke(cert_stub: Stub, device_id: str, csr_pem: str, reason: int) -> None:
    if device_id and not device_id.startswith(("-", ".")):
        # Give some examples a certificate to act on.
        await call(
            cert_stub,
            "ProvisionCertificate",
            cert_pb2.ProvisionCertificateRequest(device_id=device_id),
        )
    await call(
        cert_stub,
        "RenewCertificate",
        cert_pb2.RenewCertificateRequest(device_id=device_id, csr_pem=csr_pem),
    )
    await call(
        cert_stub,
        "RevokeCertificate",
        cert_pb2.RevokeCertificateRequest(device_id=device_id, reason=reason),  # type: ignore[arg-type]
    )
    await call(
        cert_stub,
        "RenewCertificate",
        cert_pb2.RenewCertificateRequest(device_id=device_id, csr_pem=csr_pem),
    )


async def test_ca_chain(cert_stub: Stub) -> None:
    reply = await cert_stub.GetCaChain(cert_pb2.GetCaChainRequest())
    assert reply.ca_chain_pem.startswith("-----BEGIN CERTIFICATE-----")
