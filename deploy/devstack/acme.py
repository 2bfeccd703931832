"""A local ACME world from the system's binaries: Knot DNS and Pebble.

Used by `make run` with `CERT_ISSUER=acme` (under `.run/`) and by the tests (under a
temporary directory), the way `deploy.devstack.servers` runs PostgreSQL and Redis.

- `KnotServer`: an authoritative server for the device zone (myl.zip) on loopback. Its one
  ACL lets RFC 2136 updates in only when signed with the TSIG key; an unsigned update, or
  one signed with another secret, is answered NOTAUTH (the latter with the TSIG error
  BADSIG, which dnspython raises as PeerBadSignature). An update is served by the next
  query: it lives in the zone in memory and in the journal, and the zone file is never
  rewritten by the server (`zonefile-sync: -1`), so at the next start the zone file is
  loaded and the journal replayed on top of it: records added by updates survive a
  restart, as they would on a real authoritative server.
- `PebbleServer`: Let's Encrypt's test CA, strict mode, validating DNS-01 by asking the
  Knot server directly (`-dnsserver`: three concurrent TXT queries over UDP, which Knot
  answers with authority, no recursion needed; one failing, e.g. NXDOMAIN because the
  record is not there yet, makes the challenge invalid at once, without retry). Its
  listeners use a TLS certificate from a small local CA made here, kept in its directory
  across restarts so clients that trust `ca_bundle` keep trusting it (the listener
  certificate itself is issued anew at every start). Pebble keeps everything in
  memory and makes a new issuing root at every start: a restart forgets accounts, orders
  and authorizations, and certificates it issued before no longer chain to `root_pem()`.

Both run as children in their own process group and are stopped by their own pid, never by
name, so several stacks or test runs can share a machine.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import grp
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cert_service.ca import leaf_key_usage, self_signed_ca
from cert_service.issuer import private_key_pem
from deploy.devstack.servers import (
    DevStackError,
    free_port,
    log_tail,
    spawn_logged,
    stop_process_group,
    write_private,
)

# Records are meant to change quickly (a challenge's TXT lives for seconds): every TTL,
# and the negative-caching TTL (SOA minimum), is one minute.
ZONE_TTL = 60


def _binary(name: str, package: str, *fallbacks: str) -> str:
    """`name` on PATH, else the first existing fallback (knotd lives in /usr/sbin, which
    is not on an ordinary user's PATH)."""
    found = shutil.which(name)
    if found is not None:
        return found
    for candidate in fallbacks:
        if os.access(candidate, os.X_OK):
            return candidate
    raise DevStackError(
        f"{name} not found: install it (apt-get install {package}, or make system-deps)"
    )


def _exited(process: subprocess.Popen[bytes], log: Path) -> DevStackError:
    return DevStackError(
        f"{process.args!r} exited with {process.returncode}; end of {log}:\n{log_tail(log)}"
    )


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key (RFC 8945) as both Knot and dnspython name it: `name` is a domain name
    (with or without the final dot), `algorithm` e.g. "hmac-sha256", `secret` base64."""

    name: str
    algorithm: str
    secret: str

    @classmethod
    def generate(cls, name: str = "myl-update.", algorithm: str = "hmac-sha256") -> TsigKey:
        """A random 32-byte secret: as long as the HMAC-SHA256 output, as RFC 2104
        recommends for the key length."""
        return cls(name, algorithm, base64.b64encode(secrets.token_bytes(32)).decode())

    @property
    def fqdn(self) -> str:
        return self.name if self.name.endswith(".") else self.name + "."

    def dns_key(self) -> dns.tsig.Key:
        """The key for dnspython (`dns.update.UpdateMessage(..., keyring=key.dns_key())`)."""
        return dns.tsig.Key(self.fqdn, self.secret, self.algorithm)


class KnotServer:
    """Knot DNS, authoritative for `zone` on 127.0.0.1:`port` (UDP and TCP).

    Everything is under `directory`: `knot.conf` (rewritten at every start), the zone
    file `zones/<zone>.zone` (written by us, never by the server), `run/` (pid file,
    control socket), `journal/` (the updates), `timers/`, and `knot.log`. The server runs as the
    current user. The zone has an SOA, an NS `ns1.<zone>` with an A record 127.0.0.1, and
    TTLs of one minute. Updates: only signed with `tsig`, any owner and type in the zone.
    """

    def __init__(self, directory: Path, port: int, zone: str = "myl.zip", *, tsig: TsigKey) -> None:
        self.directory = directory
        self.port = port
        self.zone = zone.lower().removesuffix(".")
        self.tsig = tsig
        self.host = "127.0.0.1"
        self.config_path = directory / "knot.conf"
        self.zone_file = directory / "zones" / f"{self.zone}.zone"
        self.log_path = directory / "knot.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str:
        return _binary("knotd", "knot", "/usr/sbin/knotd")

    def _zone_text(self) -> str:
        # A fixed serial: the zone file never changes between starts, so Knot replays its
        # journal (the updates) on top of it; Knot increments the serial on each update.
        return (
            f"$ORIGIN {self.zone}.\n"
            f"$TTL {ZONE_TTL}\n"
            f"@    SOA ns1 hostmaster 1 {ZONE_TTL} {ZONE_TTL} 3600 {ZONE_TTL}\n"
            "@    NS  ns1\n"
            "ns1  A   127.0.0.1\n"
        )

    def _config_text(self) -> str:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        run = self.directory / "run"
        tsig = self.tsig.fqdn
        # One worker of each kind: a development server on a two-core machine.
        return f"""\
# Written by deploy.devstack.acme.KnotServer at every start; edits are lost.
server:
    rundir: "{run}"
    pidfile: "{run}/knot.pid"
    user: {user}:{group}
    listen: {self.host}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

control:
    listen: "{run}/knot.sock"

database:
    storage: "{self.directory}"
    journal-db: "{self.directory}/journal"
    timer-db: "{self.directory}/timers"
    kasp-db: "{self.directory}/keys"

log:
  - target: stderr
    any: info

key:
  - id: {tsig}
    algorithm: {self.tsig.algorithm}
    secret: {self.tsig.secret}

acl:
  - id: tsig-update
    key: {tsig}
    action: update

template:
  - id: default
    storage: "{self.zone_file.parent}"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: changes

zone:
  - domain: {self.zone}.
    file: "{self.zone_file.name}"
    acl: tsig-update
"""

    def write_config(self) -> None:
        (self.directory / "run").mkdir(parents=True, exist_ok=True)
        self.zone_file.parent.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # the config holds the TSIG secret
        socket_path = self.directory / "run" / "knot.sock"
        if len(str(socket_path).encode()) > 100:
            raise DevStackError(
                f"{self.directory} is too deep for Knot's control socket ({socket_path} "
                "exceeds the 107 bytes of a unix socket path): use a shorter directory"
            )
        self.config_path.write_text(self._config_text())
        self.config_path.chmod(0o600)
        zone_text = self._zone_text()
        if not self.zone_file.exists() or self.zone_file.read_text() != zone_text:
            self.zone_file.write_text(zone_text)

    def start(self, timeout: float = 10.0) -> None:
        binary = self.binary()
        self.write_config()
        self.process = spawn_logged([binary, "-c", str(self.config_path)], self.log_path)
        try:
            self._wait_serving(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_serving(self, timeout: float) -> None:
        """Until the zone's SOA is answered over UDP: knotd binds its sockets before it
        has loaded the zone, so an open port is not enough."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        query = dns.message.make_query(self.zone + ".", dns.rdatatype.SOA)
        while True:
            if self.process.poll() is not None:
                raise _exited(self.process, self.log_path)
            with contextlib.suppress(dns.exception.DNSException, OSError):
                reply = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
                if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    return
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"Knot on {self.host}:{self.port} does not serve {self.zone} after "
                    f"{timeout}s; end of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.02)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """cert_service's settings for sending RFC 2136 updates to this server."""
        return {
            "DNS_UPDATE_SERVER": self.address,
            "DNS_TSIG_KEY_NAME": self.tsig.fqdn,
            "DNS_TSIG_ALGORITHM": self.tsig.algorithm,
            "DNS_TSIG_SECRET": self.tsig.secret,
        }

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def generate_eab(kid: str | None = None) -> dict[str, str]:
    """One External Account Binding key for `PebbleServer(eab=...)`: {kid: HMAC key}, the
    key 32 random bytes in base64url without padding (what Pebble's config decodes)."""
    return {kid or f"myl-local-{secrets.token_hex(4)}": _b64url(secrets.token_bytes(32))}


def generate_account_key(path: Path) -> Path:
    """An ACME account key at `path`: EC P-256 (signing ES256, which RFC 8555 requires
    every ACME server to support), PKCS#8 PEM, mode 0600. An existing file is kept as it
    is: the account is that key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = private_key_pem(ec.generate_private_key(ec.SECP256R1()))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return path


class PebbleServer:
    """Pebble on 127.0.0.1:`port` (ACME) and 127.0.0.1:`management_port` (its management
    interface: roots, intermediates, certificate status), validating DNS-01 against the
    DNS server on 127.0.0.1:`dns_port`.

    Under `directory`: `tls/` (the local CA `ca.pem`/`ca.key`, kept across restarts, and
    the listeners' `cert.pem`/`key.pem`, issued at every start), `pebble-config.json`,
    `pebble.log`. With `eab` ({kid: base64url HMAC key}) every new account must carry an
    External Account Binding made with one of them. `extra_env` is added to Pebble's
    environment after `PEBBLE_VA_NOSLEEP=1` (no random wait before each validation;
    pass "0" to have the waits back): e.g. `PEBBLE_WFE_NONCEREJECT` (percentage of good
    nonces rejected as badNonce, default 5), `PEBBLE_AUTHZREUSE` (percentage of new
    orders reusing a valid authorization, default 50), `PEBBLE_VA_SLEEPTIME`.
    `certificate_validity` sets the validity of the certificates it issues (Pebble's own
    default is five years).

    HTTP-01 and TLS-ALPN-01 validation would connect to `httpPort`/`tlsPort`: set to free
    ports where nothing listens, so only DNS-01 can succeed. Pebble listens on neither.
    """

    def __init__(
        self,
        directory: Path,
        port: int,
        management_port: int,
        dns_port: int,
        *,
        eab: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        certificate_validity: dt.timedelta | None = None,
    ) -> None:
        self.directory = directory
        self.port = port
        self.management_port = management_port
        self.dns_port = dns_port
        self.eab = dict(eab) if eab is not None else None
        self.extra_env = dict(extra_env or {})
        self.certificate_validity = certificate_validity
        self.host = "127.0.0.1"
        self.tls_dir = directory / "tls"
        self.config_path = directory / "pebble-config.json"
        self.log_path = directory / "pebble.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str:
        return _binary("pebble", "pebble", "/usr/bin/pebble")

    @property
    def directory_url(self) -> str:
        return f"https://{self.host}:{self.port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://{self.host}:{self.management_port}"

    @property
    def ca_bundle(self) -> Path:
        """The CA that signed Pebble's listener certificate: what a client must trust to
        talk to Pebble (not the issuing root of the certificates Pebble signs)."""
        return self.tls_dir / "ca.pem"

    def _tls_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The local CA behind `ca_bundle`: the existing one while it has more than 30
        days to live, else a new one (ten years)."""
        now = dt.datetime.now(dt.UTC)
        key_path = self.tls_dir / "ca.key"
        if self.ca_bundle.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(self.ca_bundle.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            fresh = cert.not_valid_after_utc > now + dt.timedelta(days=30)
            if fresh and isinstance(key, ec.EllipticCurvePrivateKey):
                return cert, key
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "myl local development"),
                x509.NameAttribute(NameOID.COMMON_NAME, "myl local Pebble TLS CA"),
            ]
        )
        cert = self_signed_ca(
            name,
            key.public_key(),
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=3650),
            path_length=0,
        ).sign(key, hashes.SHA256())
        write_private(key_path, private_key_pem(key))
        self.ca_bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    def _ensure_tls(self) -> None:
        """The listeners' certificate (localhost and 127.0.0.1), issued anew by the local
        CA at every start: one year, or less when the CA ends sooner."""
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = self._tls_ca()
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(self.host))]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=365), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_private(self.tls_dir / "key.pem", private_key_pem(key))
        (self.tls_dir / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "listenAddress": f"{self.host}:{self.port}",
            "managementListenAddress": f"{self.host}:{self.management_port}",
            "certificate": str(self.tls_dir / "cert.pem"),
            "privateKey": str(self.tls_dir / "key.pem"),
            "httpPort": free_port(),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab is not None,
        }
        if self.eab is not None:
            config["externalAccountMACKeys"] = self.eab
        if self.certificate_validity is not None:
            config["certificateValidityPeriod"] = int(self.certificate_validity.total_seconds())
        return {"pebble": config}

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # the config holds the EAB keys
        self._ensure_tls()
        self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")
        self.config_path.chmod(0o600)

    def start(self, timeout: float = 15.0) -> None:
        binary = self.binary()
        self.write_config()
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", **self.extra_env}
        self.process = spawn_logged(
            [
                binary,
                "-config",
                str(self.config_path),
                "-dnsserver",
                f"{self.host}:{self.dns_port}",
                "-strict",
            ],
            self.log_path,
            env,
        )
        try:
            # The management interface starts in its own goroutine: wait for both.
            self._wait_ok(self.directory_url, timeout)
            self._wait_ok(f"{self.management_url}/roots/0", timeout)
        except BaseException:
            self.stop()
            raise

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _get(self, url: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(url, timeout=timeout, context=self._ssl_context()) as reply:
            body: bytes = reply.read()
            return body

    def _wait_ok(self, url: str, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        context = self._ssl_context()
        while True:
            if self.process.poll() is not None:
                raise _exited(self.process, self.log_path)
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=1, context=context) as reply,
            ):
                if reply.status == 200:
                    return
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"Pebble does not answer {url} after {timeout}s; end of "
                    f"{self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def root_pem(self) -> str:
        """The root that Pebble's issued chains lead to (PEM), from the management
        interface. New at every start of Pebble."""
        return self._get(f"{self.management_url}/roots/0").decode()

    def env(self) -> dict[str, str]:
        """cert_service's settings for this CA. With several EAB keys, the first one."""
        env = {"ACME_DIRECTORY_URL": self.directory_url, "ACME_CA_BUNDLE": str(self.ca_bundle)}
        if self.eab:
            kid, hmac_key = next(iter(self.eab.items()))
            env.update(ACME_EAB_KID=kid, ACME_EAB_HMAC_KEY=hmac_key)
        return env

    def stop(self) -> None:
        stop_process_group(self.process, signal.SIGTERM)
        self.process = None
