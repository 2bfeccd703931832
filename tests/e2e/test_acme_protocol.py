"""The ACME server's protocol through the real gateway, with certbot's own `acme` library as the
client and hand-made JWS where no client would go: EAB single use, names of another device,
revocation both ways (ACME and the API, seen by each other and by the CRL), RFC 9773 renewal
information, key change, account deactivation, a device's deletion, and a property test of
hostile requests (each answered with a 4xx problem document of the right type, never a 5xx).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from acme import client as acme_client
from acme import jws as acme_jws
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from josepy import jwa, jwk

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.tls import GATEWAY, OPERATOR
from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import operator_key, provision
from tests.e2e.test_pki import crl_url, fetch_public
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, make_csr
from tests.fixtures.key import RunningKeyService

PROBLEM = "application/problem+json"
ERROR = "urn:ietf:params:acme:error:"


@pytest.fixture
async def cert_service(start_cert_service: StartCertService) -> RunningCertService:
    return await start_cert_service(ACME_SERVER_PORT="0")


async def eab_credentials(client: httpx.AsyncClient, gw: Gateway, key: str, device: str) -> Any:
    reply = await client.post(
        f"{gw.url}/api/v1/devices/{device}/acmeEabCredentials",
        headers={"X-API-Key": key},
        json={},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    """An ES256 account key that signs flattened JWS by hand."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(numbers.x.to_bytes(32, "big")),
            "y": b64(numbers.y.to_bytes(32, "big")),
        }

    def sign(self, header: dict[str, Any], payload: bytes) -> dict[str, str]:
        protected = b64(json.dumps(header).encode())
        body = b64(payload)
        der = self.key.sign(f"{protected}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return {
            "protected": protected,
            "payload": body,
            "signature": b64(r.to_bytes(32, "big") + s.to_bytes(32, "big")),
        }


def acme_account(directory_url: str, eab: Any) -> tuple[acme_client.ClientV2, jwk.JWKEC]:
    """A registered `acme` client (what certbot runs), bound with these EAB credentials."""
    key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = acme_client.ClientNetwork(key, alg=jwa.ES256, user_agent="myl-tests")
    directory = acme_client.ClientV2.get_directory(directory_url, net)
    client = acme_client.ClientV2(directory, net)
    binding = messages.ExternalAccountBinding.from_data(
        account_public_key=key.public_key(),
        kid=eab["kid"],
        hmac_key=eab["hmacKey"],
        directory=directory,
    )
    client.new_account(
        messages.NewRegistration.from_data(
            terms_of_service_agreed=True, external_account_binding=binding
        )
    )
    return client, key


def obtain(client: acme_client.ClientV2, names: list[str]) -> str:
    order = client.new_order(make_csr(names, common_name=names[0]).encode())
    order = client.poll_and_finalize(order)
    assert order.fullchain_pem is not None
    return str(order.fullchain_pem)


def problem_type(error: BaseException) -> str:
    assert isinstance(error, messages.Error), error
    return str(error.typ)


async def test_python_client_lifecycle_revocation_both_ways_key_change_and_deletion(
    gateway: Gateway, key_service: RunningKeyService, cert_service: RunningCertService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(timeout=30) as http:
        await provision(http, gateway, admin, "py-device")
        await provision(http, gateway, admin, "py-other")
        eab = await eab_credentials(http, gateway, admin, "py-device")
        url = f"{gateway.url}{eab['directoryPath']}"
        directory = (await http.get(url)).json()
        assert directory["meta"]["externalAccountRequired"] is True

        client, _ = await asyncio.to_thread(acme_account, url, eab)
        # Single use: the same credentials bind no second account.
        with pytest.raises(messages.Error) as reused:
            await asyncio.to_thread(acme_account, url, eab)
        assert problem_type(reused.value) == ERROR + "unauthorized"

        name = "py-device.myl.zip"
        with pytest.raises(messages.Error) as refused:
            await asyncio.to_thread(obtain, client, ["py-other.myl.zip"])
        assert problem_type(refused.value) == ERROR + "rejectedIdentifier"

        chain = await asyncio.to_thread(obtain, client, [name, f"*.{name}"])
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        # RFC 9773: an ordinary window now, an urgent one (in the past) once revoked.
        when, _ = await asyncio.to_thread(client.renewal_time, chain.encode())
        assert when is not None
        assert when > datetime.now(UTC)

        # Revoked through the API: ACME clients see it (ARI says renew now; revoking again
        # is alreadyRevoked).
        reply = await http.post(
            f"{gateway.url}/api/v1/devices/py-device/certificate:revoke",
            headers={"X-API-Key": admin},
            json={"reason": "REVOCATION_REASON_KEY_COMPROMISE"},
        )
        assert reply.status_code == 200, reply.text
        when, _ = await asyncio.to_thread(client.renewal_time, chain.encode())
        assert when is not None
        assert when <= datetime.now(UTC)
        with pytest.raises(messages.Error) as again:
            await asyncio.to_thread(client.revoke, leaf, 0)
        assert problem_type(again.value) == ERROR + "alreadyRevoked"

        # Revoked through ACME: the CRL in the certificate lists it.
        chain = await asyncio.to_thread(obtain, client, [name])
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        await asyncio.to_thread(client.revoke, leaf, 1)
        assert cert_service.app.crl_publisher is not None
        await cert_service.app.crl_publisher.run_once()
        crl = x509.load_der_x509_crl((await fetch_public(http, gateway, crl_url(leaf))).content)
        entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
        assert entry is not None

        # keyChange: the new key speaks for the account, the old one no longer has one.
        regr = client.net.account
        assert regr is not None
        account_url = regr.uri
        new_key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        await asyncio.to_thread(_key_change, client, directory, account_url, new_key)
        with pytest.raises(messages.Error) as stale:
            await asyncio.to_thread(client.query_registration, regr)
        assert problem_type(stale.value) == ERROR + "accountDoesNotExist"
        rekeyed = acme_client.ClientV2(
            messages.Directory.from_json(directory),
            acme_client.ClientNetwork(
                new_key, alg=jwa.ES256, account=client.net.account, user_agent="myl-tests"
            ),
        )
        await asyncio.to_thread(rekeyed.query_registration, regr)

        # Deleting the device deactivates its accounts.
        other_eab = await eab_credentials(http, gateway, admin, "py-other")
        other, _ = await asyncio.to_thread(acme_account, url, other_eab)
        reply = await http.delete(
            f"{gateway.url}/api/v1/devices/py-other", headers={"X-API-Key": admin}
        )
        assert reply.status_code == 200, reply.text
        with pytest.raises(messages.Error) as gone:
            await asyncio.to_thread(obtain, other, ["py-other.myl.zip"])
        assert problem_type(gone.value) == ERROR + "unauthorized"

        # Deactivation by the account itself is final.
        await asyncio.to_thread(rekeyed.deactivate_registration, regr)
        with pytest.raises(messages.Error) as deactivated:
            await asyncio.to_thread(obtain, rekeyed, [name])
        assert problem_type(deactivated.value) == ERROR + "unauthorized"


def _key_change(
    client: acme_client.ClientV2, directory: dict[str, Any], account_url: str, new_key: jwk.JWK
) -> None:
    """RFC 8555 section 7.3.5 by hand: the `acme` library has no keyChange."""
    url = directory["keyChange"]
    key = client.net.key
    assert key is not None
    old_jwk = key.public_key().to_json()
    inner = acme_jws.JWS.sign(
        json.dumps({"account": account_url, "oldKey": old_jwk}).encode(),
        key=new_key,
        alg=jwa.ES256,
        nonce=None,
        url=url,
    )
    client._post(url, inner)


@dataclass
class Hostile:
    """What the property test sends, and the problem type it must get back."""

    name: str
    build: Callable[[], tuple[str, bytes, dict[str, str]]]
    expected: str | None  # None: any 4xx problem, or a success


async def test_hostile_requests_get_problem_documents_never_a_5xx(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(timeout=30) as http:
        await provision(http, gateway, admin, "fuzz-device")
        await provision(http, gateway, admin, "fuzz-other")
        eabs = [
            await eab_credentials(http, gateway, admin, device)
            for device in ("fuzz-device", "fuzz-other", "fuzz-device")
        ]
    base = f"{gateway.url}/acme"

    def attack() -> None:
        # The services run on this test's event loop: the blocking client runs in a thread.
        with httpx.Client(timeout=30) as http_sync:
            mine, theirs = Signer(), Signer()
            account = _register(http_sync, base, mine, eabs[0])
            other_account = _register(http_sync, base, theirs, eabs[1])
            _run_hostile(http_sync, base, mine, account, other_account, eabs[2]["kid"])

    await asyncio.to_thread(attack)


def _nonce(http: httpx.Client, base: str) -> str:
    return http.head(f"{base}/new-nonce").headers["Replay-Nonce"]


def _post(
    http: httpx.Client, url: str, body: bytes, content_type: str = "application/jose+json"
) -> httpx.Response:
    return http.post(url, content=body, headers={"Content-Type": content_type})


def _register(http: httpx.Client, base: str, signer: Signer, eab: Any) -> str:
    url = f"{base}/new-account"
    hmac_key = base64.urlsafe_b64decode(eab["hmacKey"] + "==")
    protected = b64(json.dumps({"alg": "HS256", "kid": eab["kid"], "url": url}).encode())
    payload = b64(json.dumps(signer.jwk).encode())
    mac = hmac.new(hmac_key, f"{protected}.{payload}".encode(), hashlib.sha256).digest()
    binding = {"protected": protected, "payload": payload, "signature": b64(mac)}
    body = signer.sign(
        {"alg": "ES256", "jwk": signer.jwk, "nonce": _nonce(http, base), "url": url},
        json.dumps({"termsOfServiceAgreed": True, "externalAccountBinding": binding}).encode(),
    )
    reply = _post(http, url, json.dumps(body).encode())
    assert reply.status_code == 201, reply.text
    return reply.headers["Location"]


def _run_hostile(
    http: httpx.Client, base: str, signer: Signer, account: str, other_account: str, kid: str
) -> None:
    """`kid`: EAB credentials nobody used; forged bindings with it must never bind."""
    order_url = f"{base}/new-order"

    def signed(
        url: str,
        payload: bytes,
        *,
        header: dict[str, Any] | None = None,
        kid: str = account,
        nonce: str | None = None,
    ) -> bytes:
        fields: dict[str, Any] = {
            "alg": "ES256",
            "kid": kid,
            "nonce": nonce or _nonce(http, base),
            "url": url,
        }
        fields.update(header or {})
        return json.dumps(signer.sign(fields, payload)).encode()

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    )

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        kind=st.sampled_from(
            [
                "bad_signature",
                "wrong_url",
                "reused_nonce",
                "unknown_nonce",
                "oversized",
                "unknown_fields",
                "other_kid",
                "garbage",
                "alg",
                "jwk_and_kid",
                "content_type",
                "payload",
                "eab_forged",
            ]
        ),
        data=st.binary(max_size=64),
        value=json_values,
        alg=st.sampled_from(["none", "HS256", "RS512", "ES384", "EdDSA", ""]),
    )
    def hostile(kind: str, data: bytes, value: Any, alg: str) -> None:
        url, content_type = account, "application/jose+json"
        expected: str | None = "malformed"
        body: bytes
        if kind == "bad_signature":
            jws = json.loads(signed(url, b""))
            signature = bytearray(base64.urlsafe_b64decode(jws["signature"] + "=="))
            signature[len(data) % len(signature)] ^= 1 + (data[0] if data else 0) % 255
            jws["signature"] = b64(bytes(signature))
            body = json.dumps(jws).encode()
        elif kind == "wrong_url":
            body = signed(f"{base}/acct/elsewhere", b"")
            expected = "unauthorized"
        elif kind == "reused_nonce":
            nonce = _nonce(http, base)
            first = _post(http, url, signed(url, b"", nonce=nonce))
            assert first.status_code == 200, first.text
            body, expected = signed(url, b"", nonce=nonce), "badNonce"
        elif kind == "unknown_nonce":
            body, expected = signed(url, b"", nonce=b64(data or b"x")), "badNonce"
        elif kind == "oversized":
            body = signed(order_url, b"x" * (70_000 + len(data)))
            url = order_url
        elif kind == "unknown_fields":
            url = order_url
            payload = {
                "identifiers": [{"type": "dns", "value": "fuzz-device.myl.zip"}],
                "x-extra": value,
            }
            body = signed(url, json.dumps(payload).encode(), header={"x-extra": value})
            expected = None
        elif kind == "other_kid":
            body, expected = signed(url, b"", kid=other_account), "malformed"
        elif kind == "garbage":
            body = data
        elif kind == "alg":
            body, expected = signed(url, b"", header={"alg": alg}), "badSignatureAlgorithm"
        elif kind == "jwk_and_kid":
            body = signed(url, b"", header={"jwk": signer.jwk})
        elif kind == "eab_forged":
            url, expected, newcomer = f"{base}/new-account", "unauthorized", Signer()
            protected = b64(json.dumps({"alg": "HS256", "kid": kid, "url": url}).encode())
            binding = {
                "protected": protected,
                "payload": b64(json.dumps(newcomer.jwk).encode()),
                "signature": b64(hashlib.sha256(data).digest()),
            }
            header = {"alg": "ES256", "jwk": newcomer.jwk, "nonce": _nonce(http, base), "url": url}
            payload = {"termsOfServiceAgreed": True, "externalAccountBinding": binding}
            body = json.dumps(newcomer.sign(header, json.dumps(payload).encode())).encode()
        elif kind == "content_type":
            body, content_type = signed(url, b""), "application/json"
        else:
            url, expected = order_url, None
            body = signed(url, json.dumps(value).encode())
        reply = _post(http, url, body, content_type)
        assert reply.status_code < 500, (kind, reply.status_code, reply.text)
        if expected is None and reply.status_code < 400:
            return
        assert 400 <= reply.status_code < 500, (kind, reply.status_code, reply.text)
        assert reply.headers["Content-Type"].startswith(PROBLEM), (kind, reply.text)
        problem = reply.json()
        assert problem["type"].startswith(ERROR), problem
        if expected is not None:
            assert problem["type"] == ERROR + expected, (kind, problem)
        assert "Replay-Nonce" in reply.headers

    hostile()


async def test_replicas_share_nonces_accounts_and_orders(
    start_cert_service: StartCertService,
) -> None:
    """Two cert_service replicas on one database, addressed under one host name (as behind the
    gateway): a nonce one replica issued is good at the other, once; an account registered at
    one orders at the other; an order placed at one is finalized at the other."""
    first = await start_cert_service(ACME_SERVER_PORT="0")
    second = await start_cert_service(ACME_SERVER_PORT="0")
    async with internal_tls.channel(first.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(
                device_id="replicated", uuid_subdomain="replicated"
            )
        )
        eab = await stub.CreateAcmeEabCredentials(
            cert_pb2.CreateAcmeEabCredentialsRequest(device_id="replicated")
        )
    # Each replica's ACME port directly, as the gateway reaches it: TLS, the gateway's identity.
    replicas = [
        f"https://127.0.0.1:{running.app.acme_http.port}"  # type: ignore[union-attr]
        for running in (first, second)
    ]
    base = "https://acme.test/acme"
    as_gateway = as_identity(GATEWAY)

    def exercise() -> None:
        with httpx.Client(timeout=30, headers={"Host": "acme.test"}, verify=as_gateway) as http:

            def at(replica: int, path: str) -> str:
                return f"{replicas[replica]}/acme/{path}"

            def nonce(replica: int) -> str:
                return http.head(at(replica, "new-nonce")).headers["Replay-Nonce"]

            def post(replica: int, path: str, header: dict[str, Any], payload: bytes) -> Any:
                fields = {"alg": "ES256", "url": f"{base}/{path}", **header}
                body = json.dumps(signer.sign(fields, payload)).encode()
                return http.post(
                    at(replica, path),
                    content=body,
                    headers={"Content-Type": "application/jose+json"},
                )

            signer = Signer()
            url = f"{base}/new-account"
            protected = b64(json.dumps({"alg": "HS256", "kid": eab.kid, "url": url}).encode())
            payload = b64(json.dumps(signer.jwk).encode())
            key = base64.urlsafe_b64decode(eab.hmac_key + "==")
            mac = hmac.new(key, f"{protected}.{payload}".encode(), hashlib.sha256).digest()
            binding = {"protected": protected, "payload": payload, "signature": b64(mac)}
            reply = post(
                1,
                "new-account",
                {"jwk": signer.jwk, "nonce": nonce(0)},
                json.dumps(
                    {"termsOfServiceAgreed": True, "externalAccountBinding": binding}
                ).encode(),
            )
            assert reply.status_code == 201, reply.text
            account = reply.headers["Location"]
            assert account.startswith(f"{base}/acct/")
            issued = nonce(1)
            order = {"identifiers": [{"type": "dns", "value": "replicated.myl.zip"}]}
            reply = post(
                0, "new-order", {"kid": account, "nonce": issued}, json.dumps(order).encode()
            )
            assert reply.status_code == 201, reply.text
            # The same nonce again, at either replica: used.
            for replica in (0, 1):
                again = post(replica, "new-order", {"kid": account, "nonce": issued}, b"{}")
                assert again.status_code == 400
                assert again.json()["type"] == ERROR + "badNonce"
            finalize = reply.json()["finalize"].removeprefix(f"{base}/")
            csr = x509.load_pem_x509_csr(make_csr(["replicated.myl.zip"]).encode())
            der = csr.public_bytes(serialization.Encoding.DER)
            reply = post(
                1,
                finalize,
                {"kid": account, "nonce": nonce(0)},
                json.dumps({"csr": b64(der)}).encode(),
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["status"] == "valid"

    await asyncio.to_thread(exercise)


def as_identity(name: str | None) -> ssl.SSLContext:
    """A client context that trusts the internal CA and presents `name`'s identity (none:
    no certificate). The services' certificates name them, not 127.0.0.1."""
    ca = internal_tls.internal_ca().identity(GATEWAY).ca_file
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    if name is not None:
        caller = internal_tls.identity(name)
        context.load_cert_chain(caller.cert_file, caller.key_file)
    return context


async def test_the_acme_port_answers_the_gateway_alone(
    start_cert_service: StartCertService,
) -> None:
    """With internal TLS the ACME server's own port refuses a plaintext or certificate-less
    client in the handshake, and another internal identity with 403 (shared/tls.py)."""
    service = await start_cert_service(ACME_SERVER_PORT="0")
    port = service.app.acme_http.port  # type: ignore[union-attr]
    directory = f"https://127.0.0.1:{port}/acme/directory"

    def call(context: ssl.SSLContext | None) -> int:
        url = directory if context is not None else directory.replace("https", "http")
        with httpx.Client(timeout=10, verify=context or False) as http:
            return http.get(url).status_code

    assert await asyncio.to_thread(call, as_identity(GATEWAY)) == 200
    assert await asyncio.to_thread(call, as_identity(OPERATOR)) == 403
    for refused in (as_identity(None), None):
        with pytest.raises(httpx.TransportError):
            await asyncio.to_thread(call, refused)
