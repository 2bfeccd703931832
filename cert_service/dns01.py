"""DNS-01 answered by the zone's own authoritative server: RFC 2136 updates signed with TSIG.

Blocking code (dnspython's synchronous API), run in the ACME worker's threads.

Decisions:

* The records go to `_acme-challenge.<name>` with a short TTL (60 s); a WILDCARD order has
  two authorizations for the same base name, so its two values share one RRset. Each value
  is added and deleted on its own (RFC 2136 "delete an RR from an RRset"), so two orders for
  different names never touch each other's records.
* Before a challenge is answered the records are checked to be served: the authoritative
  server (the one updates go to, unless `DNS_CHECK_SERVERS` names others, e.g. the zone's
  secondaries) is asked directly, without recursion, until every value is in the answer.
* Updates go over TCP (an update carries several records; TCP has no truncation).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.tsigkeyring
import dns.update

__all__ = ["DnsSettings", "DnsUpdateError", "DnsUpdater", "challenge_name"]

TTL = 60


class DnsUpdateError(Exception):
    """An update was refused or the server did not answer; `str()` says which and why."""


@dataclass(frozen=True)
class DnsSettings:
    """Where the zone's updates go and how they are signed."""

    zone: str
    server: str
    port: int
    key_name: str
    secret: str = field(repr=False)
    algorithm: str = "hmac-sha256"
    check_servers: tuple[tuple[str, int], ...] = ()
    timeout: float = 3.0
    propagation_timeout: float = 30.0


def challenge_name(identifier: str) -> str:
    """`_acme-challenge.<base name>` for an authorization's identifier (RFC 8555 8.4)."""
    return "_acme-challenge." + identifier.removeprefix("*.").rstrip(".")


class DnsUpdater:
    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        # Set when the service stops: a wait for propagation gives up at once.
        self.stopping = threading.Event()
        self.zone = dns.name.from_text(settings.zone)
        self.keyring = dns.tsigkeyring.from_text({settings.key_name: settings.secret})
        self.key_name = dns.name.from_text(settings.key_name)
        self.algorithm = dns.name.from_text(settings.algorithm)

    def add(self, name: str, values: Sequence[str]) -> None:
        """Add TXT `values` at `name` (absolute, inside the zone)."""
        update = self._update()
        for value in values:
            update.add(self._relative(name), TTL, _txt(value))
        self._send(update, "add", name)

    def remove(self, name: str, values: Sequence[str]) -> None:
        """Delete exactly these TXT values at `name` (others stay)."""
        update = self._update()
        for value in values:
            update.delete(self._relative(name), _txt(value))
        self._send(update, "delete", name)

    def wait_served(self, name: str, values: Sequence[str]) -> None:
        """Return once every server to check answers `name` TXT with all `values`; raise
        DnsUpdateError after the propagation timeout."""
        servers = self.settings.check_servers or ((self.settings.server, self.settings.port),)
        deadline = time.monotonic() + self.settings.propagation_timeout
        wanted = set(values)
        pause = 0.02
        for host, port in servers:
            while True:
                served = self._served(host, port, name)
                if wanted <= served:
                    break
                if time.monotonic() > deadline:
                    raise DnsUpdateError(
                        f"{name} TXT not served by {host}:{port} within "
                        f"{self.settings.propagation_timeout:g}s"
                    )
                if self.stopping.wait(pause):
                    raise DnsUpdateError("the service is stopping")
                pause = min(pause * 2, 0.5)

    def _served(self, host: str, port: int, name: str) -> set[str]:
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD
        try:
            response = dns.query.udp(query, host, port=port, timeout=self.settings.timeout)
        except (dns.exception.DNSException, OSError):
            return set()
        return {
            b"".join(rdata.strings).decode("ascii", "replace")
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rdata in rrset
            if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
        }

    def _update(self) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(
            self.zone, keyring=self.keyring, keyname=self.key_name, keyalgorithm=self.algorithm
        )

    def _relative(self, name: str) -> dns.name.Name:
        absolute = dns.name.from_text(name)
        if not absolute.is_subdomain(self.zone):
            raise DnsUpdateError(f"{name} is not in the zone {self.settings.zone}")
        return absolute.relativize(self.zone)

    def _send(self, update: dns.update.UpdateMessage, what: str, name: str) -> None:
        where = f"{self.settings.server}:{self.settings.port}"
        try:
            response = dns.query.tcp(
                update, self.settings.server, port=self.settings.port, timeout=self.settings.timeout
            )
        except dns.tsig.PeerError as exc:
            raise DnsUpdateError(f"{what} {name}: {where} refused the TSIG key: {exc}") from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsUpdateError(
                f"{what} {name}: {where} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsUpdateError(f"{what} {name}: {where} answered {dns.rcode.to_text(rcode)}")


def _txt(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode("ascii")])
