"""CRLs: signing one shard, and the publisher that keeps every shard current.

RFC 5280 version 2 CRLs, sharded as Let's Encrypt's Boulder does. A certificate's shard is chosen
when it is issued (`cert_service.ca`) and named in its CRL distribution point,
`<PKI_BASE_URL>/pki/crls/<shard>.crl`; the revocation log (`revoked_certificates`, filled by a
trigger in the transaction that revokes, migration 0005) says what each shard lists.

Each CRL carries:

* a CRL number (monotonic per shard, allocated in PostgreSQL under a per-shard transaction-level
  advisory lock, so replicas never sign one shard at the same time nor reuse a number);
* the authority key identifier of the CA, and thisUpdate/nextUpdate (`CRL_VALIDITY` apart);
* a critical issuing distribution point naming the shard's URL with onlyContainsUserCerts, so a
  relying party never takes one shard's CRL for another's (RFC 5280, 5.2.5);
* per entry the revocation date and, unless it is "unspecified" (RFC 5280 says to leave that
  one out), the reason code.

Entries leave a CRL once their certificate has expired (RFC 5280 allows it; an expired
certificate fails validation anyway), and the log forgets them a day later.

When is a shard re-signed? The publisher looks every `CRL_INTERVAL` seconds (default 1) and
signs a shard that (a) has a revocation not yet in its CRL, (b) has no CRL yet, or (c) is past
half of its validity. So a revocation is listed within about one interval (plus one signature and
two round trips), and every CRL is replaced long before its nextUpdate, even when replicas are
down for a while. Several replicas may all run the publisher.

Every committed revocation reaches its CRL
------------------------------------------
The trigger that writes a revocation into the log also queues a row of its own in `crl_pending`
(migration 0008), in the revoking transaction. A queued row belongs to one revocation: it is
never shared, never updated, and deleted only by a transaction that signs its shard. The
invariant:

    A queued row is deleted only in the commit that stores a CRL of its shard signed from a
    read of the log that includes the row's revocation.

So a committed revocation is always either in its shard's stored CRL or still queued, and a
queued row makes its shard due. Why it holds under READ COMMITTED, where each statement sees
what was committed when the statement began:

1. A signing transaction deletes the shard's queued rows first (`take_entries`: a DELETE), then
   reads the log (a SELECT, a later statement and so a later snapshot). The DELETE removes only
   rows committed before it began; a row whose transaction is still open is invisible to it,
   left alone, and not waited for. The revocation behind a deleted row committed with it, so
   its log entry is visible to the SELECT that follows.
2. The deletion, the read and the stored CRL are one transaction: a pass that fails after the
   DELETE puts the rows back, and `save` raises rather than commit the DELETE without a stored
   CRL (it cannot happen under the shard's lock, but the invariant must not rest on that).
3. A later CRL never drops a revocation: every signature reads the log afresh, and the log keeps
   an entry until its certificate has expired (after which leaving the CRL is intended).
4. So a revoking transaction still open when a pass deletes, whether it wrote before the pass
   began or during it, and whether it commits during the pass or after it, keeps its row. Once
   it commits, the next pass finds the shard due: `shards_due` and the check under the lock
   both read the queue.

0005 had one mark per shard, inserted ON CONFLICT DO NOTHING: an open revocation found an
earlier revocation's mark, the pass deleted that mark and read the log without the open one,
and it committed with no mark left. A version on a per-shard mark would fix that too, but then
each revocation updates the mark and waits for the previous one in its shard (and for a signing
pass) to commit; a row per revocation keeps revocations independent of each other and of the
publisher.

Several publishers: a replica signs a shard only under the shard's transaction-level advisory
lock, taken before the DELETE and released after its commit is visible, so the next holder sees
that CRL number and those deletions; numbers only grow (`save` never stores a lower one). A
replica that finds the lock held skips the shard for this pass; whatever the holder did not read
keeps its row. Point 1 does not depend on the lock: two DELETEs at once would each remove only
rows committed before it began, and a row the other removed is skipped, not counted.

Bound: a revocation committed at t is in the CRL signed by the first pass that begins after t,
or, if another replica is signing that shard at that moment, by the pass after. With one
publisher: within the rest of the pass running at t, `CRL_INTERVAL`, and one pass.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from prometheus_client import Counter, Histogram

from cert_service.ca import LocalCertificateAuthority
from cert_service.storage import CrlStore, PublishedCrl, RevokedEntry
from shared.clock import Clock
from shared.logging import get_logger
from shared.tasks import run_periodically

log = get_logger(__name__)

CRLS_SIGNED = Counter("myl_crls_signed_total", "CRL shards signed")
CRL_SIGN_SECONDS = Histogram(
    "myl_crl_sign_seconds", "Time to read, sign and store one CRL shard", buckets=(0.01, 0.1, 1, 10)
)

REASONS: Final = {
    "key_compromise": x509.ReasonFlags.key_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
}
"""Stored reason -> CRL reason code. "unspecified" gets no reasonCode extension (RFC 5280)."""

_FILE_NAME: Final = re.compile(r"^(0|[1-9][0-9]{0,5})\.crl$")
# The log keeps an entry this long after its certificate expired (it is off the CRL by then).
_LOG_RETENTION: Final = timedelta(days=1)
# Shards a pass signs at once, each in a transaction on a connection of its own: overlapping
# their round trips makes a pass over every shard 2-4 times shorter (a pass is part of how long
# a revocation takes to be listed), while leaving most of the pool to requests.
_SHARDS_AT_ONCE: Final = 4


def parse_crl_file_name(file_name: str) -> int | None:
    """`'7.crl'` -> 7; None for anything that is not `<shard>.crl`."""
    match = _FILE_NAME.match(file_name)
    return int(match[1]) if match else None


def sign_crl(
    ca: LocalCertificateAuthority,
    shard: int,
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
    entries: Sequence[RevokedEntry],
) -> bytes:
    """One shard's CRL, DER."""
    distribution_point = x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(ca.locations.crl_url(shard))],
        relative_name=None,
        only_contains_user_certs=True,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.AuthorityKeyIdentifier(ca.key_id, None, None), critical=False)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(distribution_point, critical=True)
    )
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial_hex, 16))
            .revocation_date(entry.revoked_at.astimezone(UTC).replace(microsecond=0))
        )
        flag = REASONS.get(entry.reason)
        if flag is not None:
            revoked = revoked.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return ca.sign_crl(builder)


class CrlPublisher:
    """Keeps every shard's CRL signed and current; serves the stored CRLs."""

    def __init__(
        self,
        crls: CrlStore,
        ca: LocalCertificateAuthority,
        clock: Clock,
        *,
        validity: timedelta,
        interval: float,
    ) -> None:
        self.crls = crls
        self.ca = ca
        self.clock = clock
        self.validity = validity
        self.interval = interval
        self.issuer_key_id = ca.key_id.hex()

    async def run_once(self) -> int:
        """Sign every shard that is due; returns how many were signed here."""
        now = self.clock.now()
        refresh_before = now + self.validity / 2
        shards = await self.crls.shards_due(
            self.issuer_key_id, self.ca.locations.crl_shards, refresh_before
        )
        slots = asyncio.Semaphore(_SHARDS_AT_ONCE)

        async def publish(shard: int) -> bool:
            async with slots:
                return await self.publish(shard, refresh_before)

        # A shard that fails does not keep the others from being signed in this pass.
        outcomes = await asyncio.gather(
            *(publish(shard) for shard in shards), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if shards:
            await self.crls.forget_expired(self.issuer_key_id, now - _LOG_RETENTION)
        return sum(1 for outcome in outcomes if outcome is True)

    async def publish(self, shard: int, refresh_before: datetime) -> bool:
        with CRL_SIGN_SECONDS.time():
            async with self.crls.shard_lock(self.issuer_key_id, shard, refresh_before) as held:
                if held is None:
                    return False
                conn, previous = held
                now = self.clock.now().astimezone(UTC).replace(microsecond=0)
                # Never step back in time, whatever a replica's clock says.
                this_update = now if previous is None else max(now, previous.this_update)
                entries = await self.crls.take_entries(conn, self.issuer_key_id, shard, now)
                number = 1 if previous is None else previous.crl_number + 1
                next_update = this_update + self.validity
                der = sign_crl(self.ca, shard, number, this_update, next_update, entries)
                crl = PublishedCrl(shard, number, this_update, next_update, len(entries), der)
                await self.crls.save(conn, self.issuer_key_id, crl)
        CRLS_SIGNED.inc()
        log.info("crl signed", shard=shard, crl_number=number, entries=len(entries))
        return True

    async def current(self, shard: int) -> PublishedCrl | None:
        return await self.crls.get(self.issuer_key_id, shard)

    async def run(self) -> None:
        """A pass every `interval` seconds until cancelled; a failed pass is logged."""
        await run_periodically("crl publisher", self.run_once, self.interval)
