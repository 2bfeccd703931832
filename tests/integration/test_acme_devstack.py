"""The local ACME world of `make run` (deploy.devstack.acme): the real knotd and pebble.

Each test starts its own servers on free loopback ports under tmp_path. Pebble is told
never to reject a good nonce, so no test depends on the acme library's badNonce retry.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import pytest
from acme import challenges, client, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwa, jwk

from deploy.devstack import stack
from deploy.devstack.acme import (
    KnotServer,
    PebbleServer,
    TsigKey,
    generate_account_key,
    generate_eab,
)
from deploy.devstack.servers import DevStackError, free_port

ZONE = "myl.zip"
VALIDITY = dt.timedelta(days=90)


@pytest.fixture
def tsig() -> TsigKey:
    return TsigKey.generate()


@pytest.fixture
def knot(tmp_path: Path, tsig: TsigKey) -> Iterator[KnotServer]:
    server = KnotServer(tmp_path / "knot", free_port(), ZONE, tsig=tsig)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def eab() -> dict[str, str]:
    return generate_eab()


@pytest.fixture
def pebble(tmp_path: Path, knot: KnotServer, eab: dict[str, str]) -> Iterator[PebbleServer]:
    server = PebbleServer(
        tmp_path / "pebble",
        free_port(),
        free_port(),
        knot.port,
        eab=eab,
        extra_env={"PEBBLE_WFE_NONCEREJECT": "0"},
        certificate_validity=VALIDITY,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def txt(server: KnotServer, name: str) -> list[str]:
    """The TXT strings the server answers for `name`: one plain UDP query, as Pebble's
    DNS-01 check sends."""
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    reply = dns.query.udp(query, server.host, port=server.port, timeout=2)
    return [
        b"".join(rdata.strings).decode()
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.TXT
        for rdata in rrset
    ]


def update(key: TsigKey | None, *, add: dict[str, str] | None = None) -> dns.update.UpdateMessage:
    """An RFC 2136 update of the zone, signed with `key` unless None, adding TXT records."""
    message = dns.update.UpdateMessage(ZONE + ".", keyring=key.dns_key() if key else None)
    for name, value in (add or {}).items():
        message.add(name, 60, "TXT", value)
    return message


def send(server: KnotServer, message: dns.update.UpdateMessage) -> int:
    reply = dns.query.udp(message, server.host, port=server.port, timeout=2)
    rcode: int = reply.rcode()
    return rcode


def test_a_signed_txt_record_is_served_at_once_and_a_delete_removes_it(
    knot: KnotServer, tsig: TsigKey
) -> None:
    name = f"_acme-challenge.{uuid.uuid4()}.{ZONE}."
    assert send(knot, update(tsig, add={name: "token-1"})) == dns.rcode.NOERROR
    assert txt(knot, name) == ["token-1"]

    delete = update(tsig)
    delete.delete(name, "TXT")
    assert send(knot, delete) == dns.rcode.NOERROR
    assert txt(knot, name) == []


def test_unsigned_and_wrongly_signed_updates_are_refused(knot: KnotServer, tsig: TsigKey) -> None:
    name = f"_acme-challenge.{uuid.uuid4()}.{ZONE}."
    assert send(knot, update(None, add={name: "unsigned"})) in (
        dns.rcode.REFUSED,
        dns.rcode.NOTAUTH,
    )
    forged = TsigKey(tsig.name, tsig.algorithm, TsigKey.generate().secret)
    # Knot answers NOTAUTH with TSIG error BADSIG; dnspython raises on it.
    with pytest.raises(dns.tsig.PeerBadSignature):
        send(knot, update(forged, add={name: "forged"}))
    assert txt(knot, name) == []


def test_knot_restarts_on_the_same_port_with_the_zone_and_its_updates(
    knot: KnotServer, tsig: TsigKey
) -> None:
    name = f"_acme-challenge.{uuid.uuid4()}.{ZONE}."
    assert send(knot, update(tsig, add={name: "before-restart"})) == dns.rcode.NOERROR
    first = knot.process
    knot.stop()
    assert first is not None
    assert first.poll() is not None
    knot.start()
    soa = dns.query.udp(
        dns.message.make_query(ZONE + ".", dns.rdatatype.SOA), knot.host, port=knot.port
    )
    assert soa.rcode() == dns.rcode.NOERROR
    assert soa.answer
    assert txt(knot, name) == ["before-restart"]
    assert send(knot, update(tsig, add={name: "after-restart"})) == dns.rcode.NOERROR
    assert sorted(txt(knot, name)) == ["after-restart", "before-restart"]


def test_knot_on_a_busy_port_fails_with_its_log(tmp_path: Path, tsig: TsigKey) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        server = KnotServer(tmp_path / "knot", port, ZONE, tsig=tsig)
        with pytest.raises(DevStackError, match="address already in use"):
            server.start(timeout=5)
    assert server.process is None


def test_pebble_answers_over_tls_trusted_through_ca_bundle_and_gives_its_root(
    pebble: PebbleServer,
) -> None:
    trusting = ssl.create_default_context(cafile=str(pebble.ca_bundle))
    with urllib.request.urlopen(pebble.directory_url, context=trusting, timeout=5) as reply:
        assert reply.status == 200
        assert b"newAccount" in reply.read()
    # Without the bundle the listener certificate is not trusted.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(pebble.directory_url, context=ssl.create_default_context())

    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.subject == root.issuer


def _acme_client(pebble: PebbleServer, key_path: Path) -> tuple[client.ClientV2, jwk.JWKEC]:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    account_jwk = jwk.JWKEC(key=key)
    net = client.ClientNetwork(
        account_jwk,
        alg=jwa.ES256,
        user_agent="myl-tests",
        verify_ssl=str(pebble.ca_bundle),  # type: ignore[arg-type]
    )
    directory = client.ClientV2.get_directory(pebble.directory_url, net)
    return client.ClientV2(directory, net), account_jwk


def _register(
    acme: client.ClientV2, account_jwk: jwk.JWKEC, eab: tuple[str, str] | None
) -> messages.RegistrationResource:
    binding = None
    if eab is not None:
        binding = messages.ExternalAccountBinding.from_data(
            account_jwk.public_key(), eab[0], eab[1], acme.directory
        )
    return acme.new_account(
        messages.NewRegistration.from_data(
            terms_of_service_agreed=True, external_account_binding=binding
        )
    )


def test_account_registration_needs_the_external_account_binding(
    pebble: PebbleServer, eab: dict[str, str], tmp_path: Path
) -> None:
    env = pebble.env()
    kid, hmac_key = env["ACME_EAB_KID"], env["ACME_EAB_HMAC_KEY"]
    assert {kid: hmac_key} == eab

    acme, account_jwk = _acme_client(pebble, generate_account_key(tmp_path / "a.key"))
    with pytest.raises(messages.Error) as without:
        _register(acme, account_jwk, None)
    assert without.value.code == "externalAccountRequired"
    with pytest.raises(messages.Error) as wrong:
        _register(acme, account_jwk, (kid, next(iter(generate_eab().values()))))
    assert wrong.value.code == "unauthorized"

    account = _register(acme, account_jwk, (kid, hmac_key))
    assert account.body.status in ("valid", messages.STATUS_VALID)
    assert account.uri.startswith(f"https://127.0.0.1:{pebble.port}/")


def test_a_dns01_order_validated_through_knot_ends_in_a_chain_to_pebbles_root(
    pebble: PebbleServer, knot: KnotServer, tsig: TsigKey, eab: dict[str, str], tmp_path: Path
) -> None:
    acme, account_jwk = _acme_client(pebble, generate_account_key(tmp_path / "a.key"))
    _register(acme, account_jwk, next(iter(eab.items())))
    name = f"{uuid.uuid4()}.{ZONE}"
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(device_key, hashes.SHA256())
    )
    order = acme.new_order(csr.public_bytes(serialization.Encoding.PEM))
    for authz in order.authorizations:
        challenge = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01))
        assert isinstance(challenge.chall, challenges.DNS01)
        record = challenge.chall.validation_domain_name(name) + "."
        value = challenge.chall.validation(account_jwk)
        assert send(knot, update(tsig, add={record: value})) == dns.rcode.NOERROR
        acme.answer_challenge(challenge, challenge.chall.response(account_jwk))
    deadline = dt.datetime.now() + dt.timedelta(seconds=20)
    done = acme.poll_and_finalize(order, deadline=deadline)

    leaf, *intermediates = x509.load_pem_x509_certificates(done.fullchain_pem.encode())
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        x509.SubjectAlternativeName([x509.DNSName(name)])
    )
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert VALIDITY - dt.timedelta(seconds=2) <= lifetime <= VALIDITY
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    chain = [leaf, *intermediates]
    for child, parent in zip(chain, [*intermediates, root], strict=True):
        child.verify_directly_issued_by(parent)


def test_pebble_restarts_on_the_same_ports_and_forgets_its_accounts(
    pebble: PebbleServer, eab: dict[str, str], tmp_path: Path
) -> None:
    key_path = generate_account_key(tmp_path / "a.key")
    acme, account_jwk = _acme_client(pebble, key_path)
    _register(acme, account_jwk, next(iter(eab.items())))
    bundle = pebble.ca_bundle.read_bytes()
    old_root = pebble.root_pem()

    pebble.stop()
    pebble.start()

    # Clients keep trusting the same TLS CA; the issuing root is new.
    assert pebble.ca_bundle.read_bytes() == bundle
    assert pebble.root_pem() != old_root
    acme, account_jwk = _acme_client(pebble, key_path)
    with pytest.raises(messages.Error) as lookup:
        acme.new_account(messages.NewRegistration.from_data(only_return_existing=True))
    assert lookup.value.code == "accountDoesNotExist"


def test_account_key_is_ec_p256_pkcs8_mode_0600_and_kept(tmp_path: Path) -> None:
    path = generate_account_key(tmp_path / "acme" / "account.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    generate_account_key(path)
    assert path.read_bytes() == pem


def _stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> stack.Stack:
    monkeypatch.setattr(stack, "RUN", tmp_path)
    for name in ("CERT_ISSUER", "ACME_DIRECTORY_URL", "EDGE_TRUST_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"CERT_SERVICE_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return stack.Stack()


def test_make_run_starts_neither_by_default_nor_for_an_acme_ca_of_ones_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for env in ({}, {"CERT_ISSUER": "builtin"}, {
        "CERT_ISSUER": "acme", "ACME_DIRECTORY_URL": "https://acme.example/dir"
    }):  # fmt: skip
        default = _stack(monkeypatch, tmp_path, **env)
        assert not default.local_acme
        # An ACME CA of one's own: the device listener needs its roots (EDGE_TRUST_CA_FILE).
        assert ("DEVICE_TLS_PORT" in default.ports()) is ("ACME_DIRECTORY_URL" not in env)
        assert "KNOT_PORT" not in default.ports()
        default.start_acme()
        assert default.cert_env == {}
        assert default.stops == []
        assert not (tmp_path / "knot").exists()


def test_make_run_with_cert_issuer_acme_hands_cert_service_knot_and_pebble(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ports = {"KNOT_PORT": free_port(), "PEBBLE_PORT": free_port()}
    ports["PEBBLE_MANAGEMENT_PORT"] = free_port()
    run = _stack(
        monkeypatch,
        tmp_path,
        CERT_ISSUER="acme",
        PEBBLE_WFE_NONCEREJECT="0",
        **{name: str(port) for name, port in ports.items()},
    )
    assert {name: run.ports()[name] for name in ports} == ports
    # The device listener trusts Pebble's root, which start_acme writes.
    assert "DEVICE_TLS_PORT" in run.ports()
    assert run.edge_trust_ca_file == str(tmp_path / "acme" / "pebble-root.pem")
    assert run.udp_ports() == ["KNOT_PORT"]
    try:
        run.start_acme()
        env = run.cert_env
        assert env["DNS_UPDATE_SERVER"] == f"127.0.0.1:{ports['KNOT_PORT']}"
        assert env["ACME_DIRECTORY_URL"] == f"https://127.0.0.1:{ports['PEBBLE_PORT']}/dir"
        assert Path(env["ACME_CA_BUNDLE"]).is_file()
        assert env["ACME_ACCOUNT_KEY_FILE"] == str(tmp_path / "acme" / "account.key")
        assert env["ACME_EAB_KID"]
        assert env["ACME_EAB_HMAC_KEY"]
        key = TsigKey(env["DNS_TSIG_KEY_NAME"], env["DNS_TSIG_ALGORITHM"], env["DNS_TSIG_SECRET"])
        knot = KnotServer(tmp_path / "knot", ports["KNOT_PORT"], ZONE, tsig=key)
        name = f"_acme-challenge.{uuid.uuid4()}.{ZONE}."
        assert send(knot, update(key, add={name: "from-settings"})) == dns.rcode.NOERROR
        root = x509.load_pem_x509_certificate((tmp_path / "acme" / "pebble-root.pem").read_bytes())
        assert root.subject == root.issuer
        # A second stack on the same ports is told which one is busy. (Only the ports this
        # stack holds: the others are the documented defaults, which any connection on the
        # machine may have taken as its local port meanwhile.)
        held = {name: run.ports()[name] for name in ports}
        with pytest.raises(DevStackError, match=f"port {ports['KNOT_PORT']} \\(KNOT_PORT\\)"):
            stack.require_free_ports(held, udp=run.udp_ports())
    finally:
        run.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", ports["KNOT_PORT"]))  # Knot is gone


def test_a_dns_port_taken_for_udp_only_is_named_before_anything_starts() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        stack.require_free_ports({"KNOT_PORT": port})  # TCP alone looks free
        with pytest.raises(DevStackError, match=f"UDP port {port} \\(KNOT_PORT\\)"):
            stack.require_free_ports({"KNOT_PORT": port}, udp=["KNOT_PORT"])
