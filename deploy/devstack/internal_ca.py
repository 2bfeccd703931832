"""The internal CA of a local stack: one short-lived identity per process, renewed as it runs.

Not the device CA: this one signs only the platform's own processes (shared/tls.py says what
each identity may call). It lives in `<directory>/ca.crt` and `ca.key` (0600, in a 0700
directory), made at the first start and kept; each identity is a directory laid out as
cert-manager writes a Kubernetes Secret, so a process reads the same three files wherever
it runs:

    <directory>/<name>/tls.crt   the identity's certificate (URI SAN spiffe://myl.internal/<name>,
                                 DNS SAN <name>.myl.internal), valid for `validity`
    <directory>/<name>/tls.key   its P-256 key (0600)
    <directory>/<name>/ca.crt    the internal CA, what a peer's certificate must chain to

`Renewer` issues every identity again at half its lifetime. Each file is written beside its
place and renamed over it, the key before the certificate: a reader that catches the one
without the other (shared.tls checks that they match) keeps what it had and takes both at
its next look. The gateway's directory also holds `identity.yaml`, the file-based SDS Secret
Envoy watches (`deploy.devstack.gateway.identity_sds`), written last.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cert_service.ca import self_signed_ca
from cert_service.issuer import private_key_pem
from shared.tls import CERT_SERVICE, GATEWAY, IDENTITIES, KEY_SERVICE, server_name, spiffe_id

CA_VALIDITY: Final = timedelta(days=3650)
IDENTITY_VALIDITY: Final = timedelta(hours=24)
SDS_FILE: Final = "identity.yaml"


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write `path` beside its place and rename it there (readers never see half a file)."""
    temporary = path.with_name(f".{path.name}.new")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    if not private:
        temporary.chmod(0o644)
    os.replace(temporary, path)


@dataclass(frozen=True)
class Identity:
    """One process's three files."""

    name: str
    directory: Path

    @property
    def cert_file(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "tls.key"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def env(self, prefix: str = "") -> dict[str, str]:
        """The settings that give a service this identity (shared.config)."""
        head = f"{prefix}_" if prefix else ""
        return {
            f"{head}INTERNAL_TLS_CERT_FILE": str(self.cert_file),
            f"{head}INTERNAL_TLS_KEY_FILE": str(self.key_file),
            f"{head}INTERNAL_TLS_CA_FILE": str(self.ca_file),
        }

    def grpcurl_flags(self) -> list[str]:
        """grpcurl's flags for calling a service port as this identity."""
        return [
            "-cacert",
            str(self.ca_file),
            "-cert",
            str(self.cert_file),
            "-key",
            str(self.key_file),
        ]

    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes()).serial_number


class InternalCa:
    """The CA in `directory` (made when missing) and the identities it issued there."""

    def __init__(
        self,
        directory: Path,
        *,
        validity: timedelta = IDENTITY_VALIDITY,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sds: Callable[[Path], str] | None = None,
    ) -> None:
        self.directory = directory
        self.validity = validity
        self.now = now
        # The gateway's SDS Secret for its directory (deploy.devstack.gateway.identity_sds).
        self.sds = sds
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cert_file = directory / "ca.crt"
        key_file = directory / "ca.key"
        if not (self.cert_file.exists() and key_file.exists()):
            self._create(key_file)
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: not an EC key")
        self._key = key
        self.certificate = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        self._lock = threading.Lock()

    def _create(self, key_file: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "myl device identity"),
                x509.NameAttribute(NameOID.COMMON_NAME, "myl internal CA"),
            ]
        )
        now = self.now()
        certificate = self_signed_ca(
            name, key.public_key(), now - timedelta(minutes=5), now + CA_VALIDITY, path_length=0
        ).sign(key, hashes.SHA256())
        _write(key_file, private_key_pem(key), private=True)
        _write(self.cert_file, certificate.public_bytes(serialization.Encoding.PEM))

    def identity(self, name: str) -> Identity:
        return Identity(name, self.directory / name)

    def issue(self, name: str) -> Identity:
        """A new key and certificate for `name`, valid from now for `validity`."""
        identity = self.identity(name)
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + self.validity)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(spiffe_id(name)),
                        x509.DNSName(server_name(name)),
                    ]
                ),
                critical=True,
            )
            # Every identity serves (the services) or calls (all of them) with the same pair.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        with self._lock:
            identity.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write(identity.ca_file, self.cert_file.read_bytes())
            _write(identity.key_file, private_key_pem(key), private=True)
            _write(identity.cert_file, certificate.public_bytes(serialization.Encoding.PEM))
            if name == GATEWAY and self.sds is not None:
                _write(identity.directory / SDS_FILE, self.sds(identity.directory).encode())
        return identity

    def services_env(self) -> dict[str, str]:
        """Both services' identities, each under its prefix, for one shared environment."""
        return {
            **self.identity(CERT_SERVICE).env("CERT_SERVICE"),
            **self.identity(KEY_SERVICE).env("KEY_SERVICE"),
        }

    def renew_at(self, identity: Identity) -> datetime:
        """When `identity` is due again: half its lifetime after it began (at once when it
        cannot be read)."""
        try:
            certificate = x509.load_pem_x509_certificate(identity.cert_file.read_bytes())
        except (OSError, ValueError):
            return datetime.min.replace(tzinfo=UTC)
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        return start + (end - start) / 2

    def ensure(self, names: Sequence[str] = IDENTITIES) -> dict[str, Identity]:
        """Every identity in `names`, issued again where missing or due."""
        now = self.now()
        return {
            name: (
                self.issue(name)
                if self.renew_at(self.identity(name)) <= now
                else self.identity(name)
            )
            for name in names
        }


class Renewer:
    """A thread that issues each identity again when it is due (`InternalCa.renew_at`)."""

    def __init__(
        self, ca: InternalCa, names: Sequence[str] = IDENTITIES, *, poll: float = 60.0
    ) -> None:
        self.ca = ca
        self.names = tuple(names)
        self.poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="internal-ca", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.ca.ensure(self.names)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
