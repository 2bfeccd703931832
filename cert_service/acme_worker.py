"""The ACME worker: completes queued orders (`cert_service.storage.queue`) in the background.

Every replica runs one. A round claims as many due jobs as it has free slots
(`ACME_CONCURRENCY`), and each job runs its order in a thread (`cert_service.acme`) while an
asyncio task renews its lease. A provision or renewal on this replica wakes the worker at once;
otherwise it polls every `ACME_POLL_INTERVAL`.

Outcomes:

* the chain: stored ACTIVE (or replacing the current certificate), the cache fenced through the
  durable invalidation log, the job gone;
* a failure: the error is written on the certificate and the job is due again after the CA's
  `Retry-After`, or after a back-off doubling from `ACME_RETRY_MIN` to `ACME_RETRY_MAX` (with
  10 % jitter); an invalid order is forgotten so the next attempt places a new one; a CSR the
  CA refuses is not retried (a renewal with another CSR starts afresh);
* the account is gone at the CA (it lost its state): registered again, every replica picks the
  new URL up from PostgreSQL;
* the budget has no order left: the job waits, not counted as an attempt, until one is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client import Counter, Histogram

from cert_service.acme import AcmeClient, AcmeFailure, AcmeSettings
from cert_service.issuance import CSR_UNCHANGED, new_certificate
from cert_service.issuer import IssuedCertificate, serial_hex, spki_der
from cert_service.storage import IssuanceJob, IssuanceQueue, NewCertificate
from shared.clock import Clock
from shared.limits import SECOND_US, Limit
from shared.logging import get_logger
from shared.tasks import STOP, run_periodically

log = get_logger(__name__)

ORDERS = Counter(
    "myl_acme_orders_total",
    "ACME order attempts by outcome: issued, retry, invalid, refused, deferred, lost",
    ["outcome"],
)
PLACED = Counter("myl_acme_orders_placed", "New ACME orders placed (resumed ones are not counted)")
REVOKED = Counter("myl_acme_revocations", "Revocations the ACME CA accepted")
ISSUANCE_SECONDS = Histogram(
    "myl_acme_issuance_seconds",
    "From the request of a certificate to its storage, ACME issuer",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21_600, 86_400),
)

Changed = Callable[[str, str, int], Awaitable[None]]


def certificate_from_chain(chain_pem: str, *, occasion: str) -> NewCertificate:
    """What device_certificates stores of a chain the CA issued (leaf first)."""
    chain = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    if not chain:
        raise AcmeFailure("the CA returned no certificate")
    leaf = chain[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    public_key = leaf.public_key()
    spki = spki_der(leaf)
    issued = IssuedCertificate(
        chain_pem=chain_pem,
        leaf_pem=leaf.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        serial_hex=serial_hex(leaf.serial_number),
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        public_key_sha256=hashlib.sha256(spki).hexdigest(),
        public_key_pem=public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii"),
        issuer=leaf.issuer.rfc4514_string(),
        dns_names=names.get_values_for_type(x509.DNSName),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )
    days = max(1, round((issued.not_after - issued.not_before).total_seconds() / 86_400))
    return new_certificate(issued, days, CSR_UNCHANGED, occasion=occasion)


class AcmeWorker:
    def __init__(
        self,
        queue: IssuanceQueue,
        client: AcmeClient,
        clock: Clock,
        settings: AcmeSettings,
        changed: Changed,
        *,
        poll_interval: float = 0.5,
    ) -> None:
        self.queue = queue
        self.client = client
        self.clock = clock
        self.settings = settings
        self.changed = changed
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="acme"
        )
        self._jobs: set[asyncio.Task[None]] = set()
        self._account = asyncio.Lock()
        # The order budget as a GCRA limit: `orders` at once, then one per
        # order_period / orders (at least a microsecond, `Limit`'s smallest interval).
        period_us = max(round(settings.order_period * SECOND_US), settings.orders)
        self._budget = Limit(settings.orders, settings.orders, period_us)
        self._revoker: asyncio.Task[int] | None = None

    def poke(self) -> None:
        """A job was queued here: claim it now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and work jobs until cancelled; the jobs in flight are cancelled with it (their
        leases run out and another replica resumes their orders)."""
        try:
            await run_periodically(
                "acme worker",
                self.run_once,
                self.poll_interval,
                wake=self._wake,
                woken_by_others=True,
            )
        finally:
            if self._revoker is not None:
                self._revoker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._revoker
            self.client.close()
            for task in list(self._jobs):
                task.cancel()
            if self._jobs:
                await asyncio.wait(list(self._jobs))
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_once(self) -> int:
        """Claim what there are free slots for and start it; returns how many were claimed."""
        if self._revoker is None or self._revoker.done():
            self._revoker = asyncio.create_task(self.send_revocations(), name="acme revocations")
        free = self.settings.concurrency - len(self._jobs)
        if free <= 0:
            return 0
        try:
            jobs = await self.queue.claim(
                self.clock.now(), free, timedelta(seconds=self.settings.lease)
            )
        except Exception:
            log.warning("cannot claim ACME jobs", exc_info=True)
            return 0
        for job in jobs:
            task = asyncio.create_task(self._work(job), name=f"acme order {job.device_id}")
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)
        return len(jobs)

    async def send_revocations(self) -> int:
        """Send the due revocations to the CA; returns how many were accepted."""
        try:
            due = await self.queue.claim_revocations(
                self.clock.now(), self.settings.concurrency, timedelta(seconds=self.settings.lease)
            )
        except Exception:
            log.warning("cannot claim ACME revocations", exc_info=True)
            return 0
        sent = 0
        for serial, pem, reason, attempts in due:
            try:
                await self._ensure_account()
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self.client.revoke, pem, reason)
            except AcmeFailure as failure:
                if failure.account_lost:
                    with contextlib.suppress(Exception):
                        async with self._account:
                            self.client.account_url = await self._register()
                if failure.permanent:
                    log.error(
                        "the ACME CA refuses the revocation", serial=serial, error=str(failure)
                    )
                    with contextlib.suppress(Exception):
                        await self.queue.revocation_sent(serial)
                    continue
                delay = failure.retry_after or min(
                    self.settings.retry_max, self.settings.retry_min * 2 ** max(0, attempts - 1)
                )
                log.warning(
                    "ACME revocation failed", serial=serial, error=str(failure), retry_in=delay
                )
                with contextlib.suppress(Exception):
                    await self.queue.revocation_failed(
                        serial, str(failure), self.clock.now() + timedelta(seconds=delay)
                    )
                continue
            except Exception:
                log.warning("ACME revocation interrupted", serial=serial, exc_info=True)
                continue
            REVOKED.inc()
            with contextlib.suppress(Exception):
                await self.queue.revocation_sent(serial)
            log.info("certificate revoked at the ACME CA", serial=serial, reason=reason)
            sent += 1
        return sent

    async def _ensure_account(self) -> None:
        async with self._account:
            if self.client.account_url:
                return
            directory, thumbprint = self.settings.directory_url, self.client.thumbprint
            url = await self.queue.account_url(directory, thumbprint)
            if url is None:
                url = await self._register()
            self.client.account_url = url

    async def _register(self) -> str:
        loop = asyncio.get_running_loop()
        url = await loop.run_in_executor(self._executor, self.client.register)
        log.info("ACME account registered", account=url, directory=self.settings.directory_url)
        return await self.queue.save_account(
            self.settings.directory_url, self.client.thumbprint, url, self.clock.now()
        )

    async def _work(self, job: IssuanceJob) -> None:
        keeper = asyncio.create_task(self._keep_lease(job))
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            raise
        except AcmeFailure as failure:
            await self._failed(job, failure)
        except Exception:
            # The database is away, most likely: the lease runs out and the job is tried
            # again, by this replica or another.
            ORDERS.labels("lost").inc()
            log.warning("ACME job interrupted", device_id=job.device_id, exc_info=True)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _attempt(self, job: IssuanceJob) -> None:
        await self._ensure_account()
        if job.order_url is None:
            wait = await self.queue.spend_order(
                self.settings.directory_url, self.clock.now(), self._budget
            )
            if wait > timedelta(0):
                ORDERS.labels("deferred").inc()
                await self.queue.fail(
                    job,
                    f"order budget spent ({self.settings.orders} per "
                    f"{self.settings.order_period:g}s); next order in "
                    f"{wait.total_seconds():.0f}s",
                    self.clock.now() + wait,
                    keep_order=True,
                    count_attempt=False,
                )
                return
        loop = asyncio.get_running_loop()

        def on_order(url: str) -> None:
            PLACED.inc()
            recorded = asyncio.run_coroutine_threadsafe(self.queue.record_order(job, url), loop)
            if not recorded.result(timeout=30):
                raise AcmeFailure("the job was cancelled or taken over")

        chain = await loop.run_in_executor(
            self._executor, self.client.obtain, job.csr_pem, job.order_url, on_order
        )
        new = certificate_from_chain(chain, occasion=job.occasion or "provision")
        now = self.clock.now()
        done = await self.queue.complete(job, new, now, self.settings.directory_url)
        if done is None:
            log.info("ACME certificate not used: request cancelled", device_id=job.device_id)
            return
        record, invalidation = done
        await self.changed(record.device_id, record.uuid_subdomain, invalidation)
        renew_at = await loop.run_in_executor(self._executor, self.client.renewal_time, chain)
        if renew_at is not None:
            await self.queue.set_renewal_time(job.device_id, new.serial_number, renew_at)
        ORDERS.labels("issued").inc()
        ISSUANCE_SECONDS.observe(max(0.0, (now - job.requested_at).total_seconds()))
        log.info(
            "certificate issued by the ACME CA",
            device_id=job.device_id,
            serial=new.serial_number,
            occasion=job.occasion,
            attempts=job.attempts,
        )

    async def _failed(self, job: IssuanceJob, failure: AcmeFailure) -> None:
        if failure.account_lost:
            # Registered again, and the URL replaced at once for every thread (never unset:
            # orders of other threads in flight keep signing with a URL).
            with contextlib.suppress(Exception):
                async with self._account:
                    self.client.account_url = await self._register()
            delay: float | None = 0.0
        elif failure.permanent:
            delay = None
        elif failure.retry_after is not None:
            delay = failure.retry_after
        else:
            base = min(
                self.settings.retry_max, self.settings.retry_min * 2 ** max(0, job.attempts - 1)
            )
            delay = base * random.uniform(0.9, 1.1)
        outcome = "refused" if delay is None else "invalid" if failure.order_invalid else "retry"
        ORDERS.labels(outcome).inc()
        log.warning(
            "ACME attempt failed",
            device_id=job.device_id,
            attempt=job.attempts,
            error=str(failure),
            retry_in=delay,
        )
        due = None if delay is None else self.clock.now() + timedelta(seconds=delay)
        await self.queue.fail(job, str(failure), due, keep_order=not failure.order_invalid)

    async def _keep_lease(self, job: IssuanceJob) -> None:
        """Extend the job's lease every third of it while its order runs (`_work` cancels
        this then); ends by itself once the lease is no longer the job's. A failed extension
        (the database away) is counted, not logged: the next one may succeed in time."""
        lease = self.settings.lease

        async def extend() -> object:
            if not await self.queue.extend(job, self.clock.now() + timedelta(seconds=lease)):
                return STOP  # taken over, or the request cancelled: nothing left to keep
            return None

        await run_periodically("acme lease", extend, lease / 3, wait_first=True, quiet=(Exception,))
