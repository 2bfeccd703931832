"""Wiring: configuration -> dependencies -> constructors -> server. No work happens here."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from functools import partial

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cert_service.access import AccessRecorder, access_recorder
from cert_service.acme import AcmeClient, load_account_key
from cert_service.acme_server import AcmeHttpServer, AcmeServer, EabKeys
from cert_service.acme_worker import AcmeWorker
from cert_service.ari import RenewalPolicy
from cert_service.ca import (
    CertificateAuthorityError,
    LocalCertificateAuthority,
    load_ca_certificate,
)
from cert_service.certcache import CertificateCache, InvalidationLog
from cert_service.certificates import DeviceCertificates
from cert_service.config import SERVICE, CertServiceConfig
from cert_service.crl import CrlPublisher
from cert_service.dns01 import DnsUpdater
from cert_service.hsm import Pkcs11Signer
from cert_service.issuance import CertificateIssuer, OrderingIssuer, SigningIssuer
from cert_service.lifecycle import LifecycleWorker
from cert_service.limits import CertificateLimits
from cert_service.monitoring import FleetSampler
from cert_service.outbox import OutboxRelay
from cert_service.pki import PublicRepository
from cert_service.service import SERVICE_NAME, CertificateServicer
from cert_service.storage import CertificateStore, CrlStore, IssuanceQueue
from cert_service.storage.acme_server import AcmeServerStore
from myl.cert.v1 import cert_pb2_grpc
from shared.cache import Cache
from shared.clock import Clock, SystemClock
from shared.config import load_for_serving
from shared.db import Database, DatabaseUnavailable, open_database
from shared.invalidation import CacheGuard, CacheTrust
from shared.limits import Limiter
from shared.monitoring import ResourceSampler
from shared.server import GrpcServer
from shared.tasks import BackgroundTask


class CertApp:
    """cert_service in one process: the gRPC server and its background workers, as
    `create_app` wired them."""

    def __init__(
        self,
        config: CertServiceConfig,
        clock: Clock,
        db: Database,
        cache: Cache,
        *,
        store: CertificateStore,
        certificates: DeviceCertificates,
        access: AccessRecorder,
        outbox: OutboxRelay,
        guard: CacheGuard,
        lifecycle: LifecycleWorker,
        ca: LocalCertificateAuthority | None,
        crl_publisher: CrlPublisher | None,
        acme_worker: AcmeWorker | None,
        resources: ResourceSampler,
        fleet: FleetSampler,
        servicer: CertificateServicer,
        acme_http: AcmeHttpServer | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.db = db
        self.cache = cache
        self.store = store
        self.certificates = certificates
        self.access = access
        self.outbox = outbox
        self.guard = guard
        self.lifecycle = lifecycle
        self.ca = ca
        self.crl_publisher = crl_publisher
        self.acme_worker = acme_worker
        self.resources = resources
        self.fleet = fleet
        self.acme_http = acme_http
        self.grpc = GrpcServer(config.server)
        self.grpc.add_service(
            SERVICE_NAME,
            lambda server: cert_pb2_grpc.add_CertificateServiceServicer_to_server(servicer, server),
        )
        self.grpc.on_shutdown(self._close)
        # The workers that own no task of their own (the guard, the access counters, the
        # unconfirmed writes and the resource sampler start and stop theirs, as in key_service).
        self._workers = [BackgroundTask("cert_service outbox relay", outbox.run)]
        if config.lifecycle_interval > 0:
            run_lifecycle = partial(lifecycle.run, config.lifecycle_interval)
            self._workers.append(BackgroundTask("cert_service lifecycle", run_lifecycle))
        if crl_publisher is not None and config.crl_interval > 0:
            self._workers.append(BackgroundTask("cert_service crl publisher", crl_publisher.run))
        if acme_worker is not None:
            self._workers.append(BackgroundTask("cert_service acme worker", acme_worker.run))
        run_fleet = partial(fleet.run, config.metrics_interval)
        self._workers.append(BackgroundTask("cert_service fleet sampler", run_fleet))
        self._started = False
        self._closed = False

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> int:
        """Listen, start the workers; returns the bound port."""
        # Apply the invalidation log before the first request (see shared/invalidation.py).
        await self.guard.sync()
        port = await self.grpc.start()
        self._started = True
        if self.acme_http is not None:
            await self.acme_http.start()
        self.store.unconfirmed.start()
        self.guard.start()
        self.access.start()
        self.resources.start()
        for worker in self._workers:
            worker.start()
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Drain RPCs, then stop the workers, flush access counters, close pool and Redis."""
        if self._started:
            await self.grpc.stop(grace)
        else:
            await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(worker.stop() for worker in self._workers))
        await self.store.unconfirmed.stop()
        await self.resources.stop()
        if self.acme_http is not None:
            await self.acme_http.stop()
        await self.guard.stop()
        await self.access.stop()
        await self.outbox.close()
        await self.db.close()
        await self.cache.close()
        if self.ca is not None:
            self.ca.close()


def load_ca(config: CertServiceConfig) -> LocalCertificateAuthority:
    """The built-in CA: its certificate, and its key from a file or a token (`CA_KEY_URI`).

    Raises `CertificateAuthorityError` naming the variable to look at.
    """
    if config.ca_key_uri is None:
        try:
            return LocalCertificateAuthority.from_files(
                config.ca_cert_file, config.ca_key_file, locations=config.pki
            )
        except CertificateAuthorityError as exc:
            raise CertificateAuthorityError(f"{exc} (CA_CERT_FILE, CA_KEY_FILE)") from exc
    try:
        certificate = load_ca_certificate(config.ca_cert_file)
    except CertificateAuthorityError as exc:
        raise CertificateAuthorityError(f"{exc} (CA_CERT_FILE)") from exc
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertificateAuthorityError(
            f"unsupported CA key type {type(public_key).__name__} (CA_CERT_FILE)"
        )
    try:
        signer = Pkcs11Signer.open(config.ca_key_uri, config.ca_key_pin, public_key)
    except CertificateAuthorityError as exc:
        raise CertificateAuthorityError(f"CA_KEY_URI: {exc}") from exc
    try:
        return LocalCertificateAuthority(certificate, signer, config.pki)
    except CertificateAuthorityError as exc:
        signer.close()
        raise CertificateAuthorityError(
            f"{exc} (CA_CERT_FILE {config.ca_cert_file}, CA_KEY_URI)"
        ) from exc


async def create_app(config: CertServiceConfig, *, clock: Clock | None = None) -> CertApp:
    """Load the CA (or check the ACME account key), open the database pool and Redis client,
    and build the app (not started): the one place where the objects are wired, and where the
    issuer is chosen.

    Raises `CertificateAuthorityError` for an unusable CA and `DatabaseUnavailable` when
    PostgreSQL cannot be reached.
    """
    ca: LocalCertificateAuthority | None = None
    if config.acme is not None:
        load_account_key(config.acme.account_key_file)  # unusable: refuse to start
        secret_file = config.acme_eab_secret_file or config.acme.account_key_file
    else:
        ca = load_ca(config)
        # A key in a token cannot be read: CA_KEY_URI needs ACME_EAB_SECRET_FILE (config).
        secret_file = config.acme_eab_secret_file or config.ca_key_file
    try:
        db = await open_database(config.server.database, SERVICE)
    except BaseException:
        if ca is not None:
            ca.close()
        raise
    trust = CacheTrust(config.server.redis)
    cache = Cache.from_config(config.server.redis, trust.breaker)
    clock = clock or SystemClock()

    store = CertificateStore(db, clock)
    invalidations = InvalidationLog(store, cache, config.cache_ttl, clock)
    certificate_cache = CertificateCache(
        cache, trust, config.cache_ttl, config.negative_cache_ttl, invalidations
    )
    redis_config = config.server.redis
    guard = CacheGuard(
        trust,
        cache,
        invalidations.drain,
        interval=redis_config.invalidation_interval,
        retry_interval=redis_config.breaker_reset,
    )
    access = access_recorder(store, config.access_flush_interval)
    outbox = OutboxRelay(
        store,
        clock,
        config.key_service_address,
        timeout=config.key_service_timeout,
        interval=config.outbox_interval,
        retry_min=config.outbox_retry_min,
        retry_max=config.outbox_retry_max,
        tls=config.server.tls,
    )
    renewal = RenewalPolicy(
        config.renew_at_fraction, config.ari_explanation_url, config.reissue_issued_before
    )

    issuer: CertificateIssuer
    crl_publisher: CrlPublisher | None = None
    repository: PublicRepository | None = None
    acme_worker: AcmeWorker | None = None
    if ca is not None:
        issuer = SigningIssuer(ca, store, certificate_cache.changed, config.cert_validity_days)
        crl_publisher = CrlPublisher(
            CrlStore(db),
            ca,
            clock,
            validity=timedelta(seconds=config.crl_validity),
            interval=config.crl_interval,
        )
        repository = PublicRepository(ca, crl_publisher)
    else:
        # CERT_ISSUER=acme sets both (`CertServiceConfig.from_env`).
        assert config.acme is not None
        assert config.dns is not None
        queue = IssuanceQueue(db)
        acme_worker = AcmeWorker(
            queue,
            AcmeClient(config.acme, DnsUpdater(config.dns)),
            clock,
            config.acme,
            certificate_cache.changed,
            poll_interval=config.acme_poll_interval,
        )
        issuer = OrderingIssuer(queue, store, certificate_cache.changed, acme_worker.poke)

    certificates = DeviceCertificates(
        store,
        certificate_cache,
        issuer,
        access,
        outbox,
        clock,
        CertificateLimits(
            Limiter(cache, config.limits, clock),
            config.renew_at_fraction,
            config.cert_validity_days,
        ),
    )
    lifecycle = LifecycleWorker(
        store,
        certificate_cache,
        issuer,
        clock,
        renew_at_fraction=config.renew_at_fraction,
        batch_size=config.lifecycle_batch_size,
        renewal=renewal,
    )
    acme_server: AcmeServer | None = None
    acme_http: AcmeHttpServer | None = None
    if config.acme_server_port is not None:
        # EAB keys are derived from the service's own secret (ACME_EAB_SECRET_FILE, else the
        # CA key file or the ACME account key): every replica derives the same ones, and the
        # database holds none.
        acme_server = AcmeServer(
            AcmeServerStore(db),
            certificates,
            EabKeys(secret_file.read_bytes()),
            clock,
            renewal,
            terms_url=config.acme_terms_url,
        )
        acme_http = AcmeHttpServer(
            acme_server, config.server.host, config.acme_server_port, config.server.tls
        )
    servicer = CertificateServicer(
        certificates,
        config.dns_zone,
        config.cert_validity_days,
        clock=clock,
        renewal=renewal,
        repository=repository,
        acme_server=acme_server,
        # The gateway holds our CRLs only: ACME certificates are checked here (the servicer).
        edge_checks_revocation=ca is not None,
    )
    return CertApp(
        config,
        clock,
        db,
        cache,
        store=store,
        certificates=certificates,
        access=access,
        outbox=outbox,
        guard=guard,
        lifecycle=lifecycle,
        ca=ca,
        crl_publisher=crl_publisher,
        acme_worker=acme_worker,
        resources=ResourceSampler(SERVICE, db, cache, config.metrics_interval),
        fleet=FleetSampler(store, ca, clock, config.renew_at_fraction),
        servicer=servicer,
        acme_http=acme_http,
    )


async def _serve(config: CertServiceConfig) -> int:
    try:
        app = await create_app(config)
    except CertificateAuthorityError as exc:
        print(f"cert_service: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(
            f"cert_service: ACME account key unusable: {exc} (ACME_ACCOUNT_KEY_FILE)",
            file=sys.stderr,
        )
        return 2
    except DatabaseUnavailable as exc:
        print(f"cert_service: {exc}", file=sys.stderr)
        return 1
    try:
        await app.start()
    except (OSError, RuntimeError) as exc:
        print(f"cert_service: cannot start: {exc}", file=sys.stderr)
        await app.stop()
        return 1
    await app.grpc.serve_until_signalled()
    return 0


def main() -> int:
    """`python -m cert_service serve`."""
    config = load_for_serving(SERVICE, CertServiceConfig.from_env)
    if config is None:
        return 2
    return asyncio.run(_serve(config))
