"""Mutual TLS between the platform's own processes, and who may call what.

Every service port speaks TLS and asks the caller for a certificate from the platform's
internal CA (never the device CA: a device's certificate opens nothing here). A caller
without one, with one from another CA, or speaking plaintext is refused in the handshake,
before any RPC exists. Each process has one identity, a certificate whose URI SAN is
`spiffe://myl.internal/<name>` and whose DNS SAN is `<name>.myl.internal` (underscores as
dashes); it serves with it and calls the other services with it.

Certificates are short-lived (a day in `make run` and the tests), so they are rotated while
the processes run: the server's credentials are fetched again at each new handshake when
one of the three files changed (`grpc.dynamic_ssl_server_credentials`), and a client
channel (`InternalChannel`) is opened anew with the new files at its next call after they
changed. Whoever writes the files (the local stack, cert-manager in Kubernetes) replaces
them whole; a change is noticed by modification time and size.

Then the method: `CALLERS` is the one table of which identity may call which method of which
service, enforced by the server's handler wrapper (`shared.server`) from the peer's
verified SPIFFE id: anything else is PERMISSION_DENIED. Health checking and reflection are
open to every identity of the internal CA (the gateway health-checks, an operator lists).
docs/security.md shows the table.

`INTERNAL_TLS=off` turns all of this off, for debugging a service with a plaintext client
(grpcurl -plaintext) on a developer's machine; it is refused with ENVIRONMENT=production.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

TRUST_DOMAIN: Final = "myl.internal"

CERT_SERVICE: Final = "cert_service"
KEY_SERVICE: Final = "key_service"
GATEWAY: Final = "gateway"
EDGE_TRUST: Final = "edge_trust"
OPERATOR: Final = "operator"
# Every identity the internal CA issues.
IDENTITIES: Final = (CERT_SERVICE, KEY_SERVICE, GATEWAY, EDGE_TRUST, OPERATOR)

_CERT: Final = "/myl.cert.v1.CertificateService/"
_KEY: Final = "/myl.key.v1.ApiKeyService/"
_CHECK: Final = "/envoy.service.auth.v3.Authorization/Check"
_EVERYTHING: Final = "/"

# server -> caller -> the methods it may call (a full method, or a prefix ending in "/").
CALLERS: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    CERT_SERVICE: {
        # Every method of the public contract: the gateway routes only the public ones, and
        # key_service's check decides which key may call which.
        GATEWAY: (_CERT,),
        # Does the device exist with an active certificate? (key_service.devices)
        KEY_SERVICE: (_CERT + "GetCertificate",),
        # The device CA and its CRLs for the gateway's device listener (cert_service.edge_trust).
        EDGE_TRUST: (_CERT + "GetCrl", _CERT + "GetIssuerCertificate"),
        OPERATOR: (_EVERYTHING,),
    },
    KEY_SERVICE: {
        # The external authorization check of every gateway request, and the public
        # methods; VerifyApiKey has no route and is not the gateway's to call.
        GATEWAY: (
            _CHECK,
            *(
                _KEY + name
                for name in (
                    "GenerateApiKey",
                    "GetApiKey",
                    "ListApiKeys",
                    "RotateApiKey",
                    "RevokeApiKey",
                    "RevokeDeviceApiKeys",
                    "ListAuditEvents",
                )
            ),
        ),
        # The delete cascade, and nothing else (cert_service.outbox).
        CERT_SERVICE: (_KEY + "RevokeDeviceApiKeys",),
        OPERATOR: (_EVERYTHING,),
    },
}


def spiffe_id(name: str) -> str:
    """The URI SAN of identity `name`: what a server reads to know its caller."""
    return f"spiffe://{TRUST_DOMAIN}/{name}"


def server_name(name: str) -> str:
    """The DNS SAN of identity `name`: what a caller checks the server's certificate for,
    so key_service talks to cert_service and not to any holder of an internal certificate."""
    return f"{name.replace('_', '-')}.{TRUST_DOMAIN}"


def identity_of(spiffe: str) -> str | None:
    """The identity name in a SPIFFE id of this trust domain, else None."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    return spiffe[len(prefix) :] if spiffe.startswith(prefix) else None


def peer_identity_of(peercert: Mapping[str, Any] | None) -> str | None:
    """The identity in the SPIFFE URI of a peer certificate as `ssl` reports it
    (`SSLSocket.getpeercert()`), else None."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI":
            found = identity_of(str(value))
            if found is not None:
                return found
    return None


def allowed_callers(service: str, full_method: str) -> frozenset[str]:
    """The SPIFFE ids that may call `full_method` on `service`."""
    return frozenset(
        spiffe_id(caller)
        for caller, methods in CALLERS.get(service, {}).items()
        if any(full_method == m or (m.endswith("/") and full_method.startswith(m)) for m in methods)
    )


def peer_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The caller's verified SPIFFE id (the handshake checked its chain), else None."""
    values = list(context.auth_context().get("peer_spiffe_id", ()))
    return values[0].decode() if values else None


@dataclass(frozen=True)
class InternalTls:
    """This process's identity files, and whether internal TLS is on at all."""

    enabled: bool = True
    cert_file: Path = Path()
    key_file: Path = Path()
    ca_file: Path = Path()
    # The variables of files that were not named (shared.config.require_internal_tls).
    unset: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return (self.cert_file, self.key_file, self.ca_file)

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """Changes whenever one of the files is replaced."""
        stamps = []
        for path in self.files:
            try:
                info = path.stat()
            except OSError:
                stamps.append((-1, -1))
            else:
                stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, key, CA certificates), PEM. OSError also when the key is not
        the certificate's: a reader caught between the renames of a renewal."""
        if self.unset:
            raise FileNotFoundError(f"{self.unset[0]} is not set (internal TLS)")
        chain, key, ca = (path.read_bytes() for path in self.files)
        certificate = x509.load_pem_x509_certificate(chain)
        private = serialization.load_pem_private_key(key, password=None)
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(
            serialization.Encoding.DER, public
        ) != private.public_key().public_bytes(serialization.Encoding.DER, public):
            raise OSError(f"{self.key_file} is not the key of {self.cert_file} (being replaced?)")
        return chain, key, ca

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate from the internal CA and pick up
        new files at the next handshake after they change. A file that cannot be read then
        (caught mid-replacement) leaves the previous credentials in use."""
        chain, key, ca = self.read()
        seen = [self.stamp()]

        def configuration() -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal chain, key, ca
            stamp = self.stamp()
            if stamp == seen[0]:
                return None
            try:
                chain, key, ca = self.read()
            except (OSError, ValueError):
                return None
            seen[0] = stamp
            return configuration()

        return grpc.dynamic_ssl_server_credentials(
            configuration(),
            fetch,  # type: ignore[arg-type]  # None: keep the current configuration
            require_client_authentication=True,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for an HTTP port (cert_service's ACME server): TLS 1.3 only, a
        client certificate from the internal CA required. `refresh` loads renewed files
        into it; handshakes after that present them."""
        self.read()  # a readable, matching pair, or the error now
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def refresh(
        self, context: ssl.SSLContext, seen: tuple[tuple[int, int], ...]
    ) -> tuple[tuple[int, int], ...]:
        """Load the files into `context` again if they changed since `seen` (and are a
        matching pair); returns the stamp now in use."""
        stamp = self.stamp()
        if stamp == seen:
            return seen
        try:
            self.read()
            context.load_verify_locations(cafile=str(self.ca_file))
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ValueError, ssl.SSLError):
            return seen  # caught mid-replacement: the next look takes it
        return stamp

    def channel_credentials(self) -> grpc.ChannelCredentials:
        chain, key, ca = self.read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=chain
        )


class InternalChannel:
    """A channel to another service of the platform, as this process's identity.

    `peer` is the identity the server must prove (its DNS SAN is checked, whatever address
    it is reached at). `get()` returns the channel for the next call: a new one, with the
    new files, once they changed (looked at no more than once a second); the previous one
    is closed once the calls already on it finished (at most `linger` seconds). With
    internal TLS off, a plaintext channel.
    """

    def __init__(
        self,
        target: str,
        tls: InternalTls,
        peer: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        linger: float = 5.0,
        check_interval: float = 1.0,
    ) -> None:
        self.target = target
        self.tls = tls
        self.peer = peer
        self.options = list(options)
        self.linger = linger
        self.check_interval = check_interval
        self._channel: grpc.aio.Channel | None = None
        self._stamp: tuple[tuple[int, int], ...] = ()
        self._checked = 0.0
        self._closing: set[asyncio.Task[None]] = set()

    def _open(self) -> grpc.aio.Channel:
        if not self.tls.enabled:
            return grpc.aio.insecure_channel(self.target, options=self.options)
        self._stamp = self.tls.stamp()
        return grpc.aio.secure_channel(
            self.target,
            self.tls.channel_credentials(),
            options=[*self.options, ("grpc.ssl_target_name_override", server_name(self.peer))],
        )

    def get(self) -> grpc.aio.Channel:
        channel = self._channel
        if channel is None:
            channel = self._channel = self._open()
            self._checked = time.monotonic()
            return channel
        if self.tls.enabled:
            now = time.monotonic()
            if now - self._checked >= self.check_interval:
                self._checked = now
                if self.tls.stamp() != self._stamp:
                    try:
                        self._channel = self._open()
                    except (OSError, ValueError):
                        return channel  # caught mid-replacement: the next look takes it
                    self._close_later(channel)
                    return self._channel
        return channel

    @property
    def current(self) -> grpc.aio.Channel | None:
        """The channel of the last `get()`, if any."""
        return self._channel

    def reset(self) -> None:
        """Forget the channel: the next `get()` connects afresh (no reconnect backoff)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            self._close_later(channel)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the channel dies with its loop
            return
        task = loop.create_task(self._close_when_done(channel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_done(self, channel: grpc.aio.Channel) -> None:
        # grpc's own grace: new calls are refused at once, and the close returns as soon as
        # the calls already on the channel are done (at most `linger` seconds).
        try:
            await channel.close(self.linger)
        except asyncio.CancelledError:
            await channel.close(None)
            raise

    async def close(self, *, drain: bool = False) -> None:
        """Close every channel; with `drain`, once the calls already on them finished (at
        most `linger` seconds)."""
        self.reset()
        if not drain:
            for task in self._closing:
                task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
