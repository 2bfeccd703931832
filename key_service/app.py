"""key_service wiring: config -> dependencies -> servicers -> server."""

from __future__ import annotations

import asyncio

from key_service.authz import AuthorizationServicer
from key_service.config import SERVICE, KeyServiceConfig
from key_service.devices import CertServiceDirectory, DeviceDirectory
from key_service.ratelimit import LocalLimiter
from key_service.scriptclient import script_client
from key_service.service import ApiKeyServicer
from key_service.storage import KeyStore
from key_service.usage import UsageBuffer, usage_buffer
from key_service.verify import Verifier
from myl.envoy.service.auth.v3 import external_auth_pb2_grpc
from myl.key.v1 import key_pb2_grpc
from shared.cache import Cache
from shared.clock import Clock, SystemClock
from shared.config import load_for_serving
from shared.db import Database, DatabaseUnavailable, open_database
from shared.invalidation import CacheGuard, CacheTrust
from shared.limits import Limiter
from shared.logging import get_logger
from shared.monitoring import ResourceSampler
from shared.seal import Seal
from shared.server import GrpcServer

log = get_logger(__name__)

API_KEY_SERVICE = "myl.key.v1.ApiKeyService"
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


class KeyApp:
    """A built key_service: `start()` serves, `stop()` drains and flushes."""

    def __init__(
        self,
        *,
        config: KeyServiceConfig,
        server: GrpcServer,
        db: Database,
        cache: Cache,
        usage: UsageBuffer,
        devices: DeviceDirectory,
        verifier: Verifier,
        store: KeyStore,
        guard: CacheGuard,
        resources: ResourceSampler,
    ) -> None:
        self.config = config
        self.server = server
        self.db = db
        self.cache = cache
        self.usage = usage
        self.devices = devices
        self.verifier = verifier
        self.store = store
        self.guard = guard
        self.resources = resources
        self.port = 0

    async def start(self) -> int:
        # Apply the invalidation log before the first request, so that Redis is trusted
        # from the start when it answers (and not before).
        await self.guard.sync()
        self.port = await self.server.start()
        self.usage.start()
        self.guard.start()
        self.resources.start()
        self.store.unconfirmed.start()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, drain in-flight RPCs, flush usage, close clients."""
        await self.server.stop(grace)

    async def serve_until_signalled(self) -> None:
        await self.start()
        await self.server.serve_until_signalled()


async def create_app(config: KeyServiceConfig, *, clock: Clock | None = None) -> KeyApp:
    clock = clock or SystemClock()
    db = await open_database(config.server.database, SERVICE)
    trust = CacheTrust(config.server.redis)
    cache = Cache.from_config(config.server.redis, trust.breaker)
    scripts = script_client(config.server.redis)
    store = KeyStore(db, clock)
    usage = usage_buffer(store, config.usage_flush_interval)
    devices = CertServiceDirectory(
        config.cert_service_address, config.cert_service_timeout, config.server.tls
    )
    verifier = Verifier(
        store=store,
        cache=cache,
        trust=trust,
        usage=usage,
        clock=clock,
        cache_ttl=config.cache_ttl,
        negative_cache_ttl=config.negative_cache_ttl,
        local_limiter=LocalLimiter(config.local_limiter_max_keys),
        scripts=scripts,
        seal=Seal("api_key", int(config.cache_ttl * 1_000_000)),
    )
    limiter = Limiter(cache, config.limits, clock)
    servicer = ApiKeyServicer(
        config=config,
        store=store,
        verifier=verifier,
        devices=devices,
        clock=clock,
        limiter=limiter,
    )
    authorization = AuthorizationServicer(verifier, limiter)
    resources = ResourceSampler(SERVICE, db, cache, config.metrics_interval)
    redis_config = config.server.redis
    guard = CacheGuard(
        trust,
        cache,
        verifier.drain_invalidations,
        interval=redis_config.invalidation_interval,
        retry_interval=redis_config.breaker_reset,
    )

    server = GrpcServer(config.server)
    server.add_service(
        API_KEY_SERVICE, lambda s: key_pb2_grpc.add_ApiKeyServiceServicer_to_server(servicer, s)
    )
    server.add_service(
        AUTHORIZATION_SERVICE,
        lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorization, s),
    )
    # After the drain, in order: write usage, then close what it needs last.
    server.on_shutdown(resources.stop)
    server.on_shutdown(usage.stop)
    server.on_shutdown(guard.stop)
    server.on_shutdown(store.unconfirmed.stop)
    server.on_shutdown(devices.close)
    server.on_shutdown(scripts.close)
    server.on_shutdown(cache.close)
    server.on_shutdown(db.close)
    return KeyApp(
        config=config,
        server=server,
        db=db,
        cache=cache,
        usage=usage,
        devices=devices,
        verifier=verifier,
        store=store,
        guard=guard,
        resources=resources,
    )


async def _serve(config: KeyServiceConfig) -> None:
    app = await create_app(config)
    await app.serve_until_signalled()


def main() -> int:
    config = load_for_serving(SERVICE, KeyServiceConfig.from_env)
    if config is None:
        return 2
    try:
        # asyncio's own loop: grpc.aio on uvloop measured several times slower here.
        asyncio.run(_serve(config))
    except DatabaseUnavailable as exc:
        log.error("cannot start", error=str(exc))
        return 1
    return 0
