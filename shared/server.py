"""The gRPC server builder both services use.

It registers health checking, reflection, the error/logging/metrics
interceptor and a Prometheus endpoint, and drains gracefully on SIGTERM:
health turns NOT_SERVING while requests are still served for
`SHUTDOWN_DRAIN_DELAY` seconds (the gateway's health checks move traffic
away), then new RPCs are refused, in-flight ones get `shutdown_grace`
seconds, then the shutdown hooks (flush counters, close pools) run in order.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NoReturn, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import start_http_server

from shared import idempotency
from shared.config import ServerConfig
from shared.errors import DomainError, ErrorKind, internal_error, permission_denied
from shared.identity import AUTHORIZED_METHOD_HEADER, CERT_NAMES_HEADER, KEY_ID_HEADER
from shared.logging import REQUEST_CONTEXT, get_logger
from shared.metrics import RPC_LATENCY, RPC_RESULTS
from shared.reflection import ReflectionServicer
from shared.tls import allowed_callers, identity_of, peer_spiffe_id
from shared.wire import MAX_REQUEST_BYTES, Undecodable, tolerant_deserializer, undecodable_error

log = get_logger(__name__)

ShutdownHook = Callable[[], Awaitable[None]]
Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]

REQUEST_ID_HEADER = "x-request-id"
# The gateway's external authorization RPC (key_service).
_CHECK_PREFIX = "/envoy.service.auth.v3.Authorization/"


# The id of a call that brought none (logs carry it): this process's random prefix and a
# counter, unique without a system call per request. uuid4 reads os.urandom, which releases
# the GIL on a server whose gRPC threads want it: about 8 us of CPU per call (a Check sent
# straight to key_service, 263-267 -> 253-260 us; the gateway sends an id of its own).
_ID_PREFIX: Final = secrets.token_hex(8)
_ID_COUNTER: Final = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _call_facts(metadata: Any) -> tuple[str, bool, str | None]:
    """The request id, whether the gateway authorized the call (a key id, or a device
    certificate's names), and the method it authorized, in one pass over the metadata."""
    request_id: str | None = None
    via_gateway = False
    authorized: str | None = None
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            if request_id is None and isinstance(value, str) and 0 < len(value) <= 128:
                request_id = value
        elif key in (KEY_ID_HEADER, CERT_NAMES_HEADER):
            via_gateway = True
        elif key == AUTHORIZED_METHOD_HEADER and isinstance(value, str):
            authorized = value
    return request_id or _new_request_id(), via_gateway, authorized


def caller_not_allowed(peer: str | None) -> DomainError:
    """The caller's internal identity may not call this method (shared.tls.CALLERS)."""
    who = identity_of(peer or "") or peer or "an unknown identity"
    return permission_denied(f"{who} may not call this method", "CALLER_NOT_ALLOWED")


def unauthorized_method() -> DomainError:
    """The gateway authorized another method than the one about to run."""
    return permission_denied(
        "the gateway authorized another method for this request", "METHOD_NOT_AUTHORIZED"
    )


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Binds the request id, records metrics and turns errors into statuses.

    `DomainError` becomes its gRPC code with ErrorInfo (and BadRequest)
    details; any other exception is logged with its traceback and the client
    gets a bare INTERNAL.

    A request with an AIP-155 `request_id` that this process is serving already
    (same method, same id, until that answer is sent) is a duplicate in flight:
    ABORTED at once (`idempotency.in_progress`), before it reads, spends a limit
    or writes anything. Duplicates on other replicas are told apart by the
    database (shared/idempotency.py).

    `GrpcServer` does not install this as a grpc.aio interceptor (that costs
    a coroutine chain per RPC): it wraps each unary handler once, when the
    service is registered (`wrap_handler`). `intercept_service` remains for
    servers that want it as an ordinary interceptor.

    With `check_callers`, a call is first checked against the internal mutual TLS
    identity of its caller: PERMISSION_DENIED unless `shared.tls.CALLERS` lets that
    identity call this method of this service.
    """

    def __init__(self, service: str, *, check_callers: bool = False) -> None:
        self.service = service
        self.check_callers = check_callers
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._running: set[tuple[str, uuid.UUID]] = set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        return self.wrap_handler(method, handler)

    def wrap_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` with error mapping, metrics and the request id; once per method."""
        if handler is None or handler.unary_unary is None or method.startswith("/grpc."):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),  # type: ignore[arg-type]
            # A request that does not parse, or is larger than the public limit, reaches
            # the handler wrapper as Undecodable. The gateway's own Check carries a whole
            # REST body and its headers: only it may be larger.
            request_deserializer=tolerant_deserializer(
                handler.request_deserializer,
                None if method.startswith(_CHECK_PREFIX) else MAX_REQUEST_BYTES,
            ),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, full_method: str, behavior: Behavior) -> Behavior:
        name = full_method.rsplit("/", 1)[-1]
        observe = RPC_LATENCY.labels(self.service, name).observe
        results = RPC_RESULTS
        service = self.service
        ok = results.labels(service, name, "OK").inc
        set_context = REQUEST_CONTEXT.set
        perf_counter = time.perf_counter
        running = self._running
        # Whether this method's requests have a request_id field: known at the first call.
        idempotent: list[bool] = []
        callers = allowed_callers(service, full_method) if self.check_callers else None

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id, via_gateway, authorized = _call_facts(context.invocation_metadata())
            # Each RPC runs in its own task, so the context var needs no reset.
            set_context((request_id, name))
            start = perf_counter()
            try:
                if callers is not None:
                    peer = peer_spiffe_id(context)
                    if peer not in callers:
                        raise caller_not_allowed(peer)
                if via_gateway and authorized != full_method:
                    raise unauthorized_method()
                if request.__class__ is Undecodable:
                    raise undecodable_error(request)
                if not idempotent:
                    idempotent.append("request_id" in request.DESCRIPTOR.fields_by_name)
                aip155_id = _aip155_id(request) if idempotent[0] else None
                if aip155_id is None:
                    response = await behavior(request, context)
                else:
                    claim = (name, aip155_id)
                    if claim in running:
                        raise idempotency.in_progress(aip155_id)
                    running.add(claim)
                    try:
                        response = await behavior(request, context)
                    finally:
                        running.discard(claim)
            except DomainError as err:
                results.labels(service, name, err.kind.grpc_code.name).inc()
                observe(perf_counter() - start)
                await _abort(context, err)
            except asyncio.CancelledError:
                results.labels(service, name, "CANCELLED").inc()
                raise
            except grpc.aio.AbortError:
                code = context.code()
                results.labels(service, name, code.name if code else "UNKNOWN").inc()
                raise
            except Exception:
                results.labels(service, name, "INTERNAL").inc()
                observe(perf_counter() - start)
                log.exception("unhandled error")
                await _abort(context, internal_error())
            observe(perf_counter() - start)
            ok()
            return response

        return handle


def _aip155_id(request: Any) -> uuid.UUID | None:
    """The request's AIP-155 id; None when it has none, or one the handler will refuse."""
    try:
        return idempotency.parse_request_id(request.request_id)
    except DomainError:
        return None


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: DomainError) -> NoReturn:
    if err.kind is not ErrorKind.INTERNAL:
        log.info("rpc refused", code=err.kind.name, reason=err.reason, error=err.message)
    status = err.to_status()
    trailers: tuple[tuple[str, str | bytes], ...] = (
        ("grpc-status-details-bin", status.SerializeToString()),
    )
    if err.retry_after is not None:
        # The gateway passes it on as the HTTP `Retry-After` header (whole seconds).
        trailers += (("retry-after", str(max(1, math.ceil(err.retry_after)))),)
    await context.abort(err.kind.grpc_code, err.message, trailing_metadata=trailers)
    raise AssertionError("context.abort returned")  # it always raises


class _WrappedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(
        self, inner: grpc.GenericRpcHandler[Any, Any], interceptor: RpcInterceptor
    ) -> None:
        self.inner = inner
        self.interceptor = interceptor

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        return self.interceptor.wrap_handler(handler_call_details.method, handler)


class _Registrar:
    """The server as `add_service` callbacks see it: every handler added is wrapped."""

    def __init__(self, server: grpc.aio.Server, interceptor: RpcInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_WrappedGenericHandler(h, self._interceptor) for h in handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrap = self._interceptor.wrap_handler
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name,
            {name: wrap(f"/{service_name}/{name}", h) for name, h in handlers.items()},
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class GrpcServer:
    """A grpc.aio server with the shared furniture attached."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # No grpc.aio interceptor: handlers are wrapped once, at registration.
        self.interceptor = RpcInterceptor(config.service, check_callers=config.tls.enabled)
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                # Above the public limit (MAX_REQUEST_BYTES, checked per method), for the
                # gateway's Checks that carry a whole REST body.
                ("grpc.max_receive_message_length", 1024 * 1024),
                # Well above what the gateway lets through (8 KiB of request headers plus
                # its own), so a caller never sees RESOURCE_EXHAUSTED for a long URL.
                ("grpc.max_metadata_size", 32 * 1024),
                ("grpc.absolute_max_metadata_size", 64 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self._hooks: list[ShutdownHook] = []
        self.port = 0

    def add_service(self, full_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        register(cast(grpc.aio.Server, _Registrar(self.server, self.interceptor)))
        self.service_names.append(full_name)

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Hooks run after the drain, in the order they were added."""
        self._hooks.append(hook)

    async def start(self) -> int:
        names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(names), self.server
        )
        tls = self.config.tls
        if tls.enabled:
            self.port = self.server.add_secure_port(self.config.address, tls.server_credentials())
        else:
            log.warning("internal TLS is off: this port answers anyone (INTERNAL_TLS=off)")
            self.port = self.server.add_insecure_port(self.config.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.address}")
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, addr=self.config.host)
        log.info(
            "serving",
            address=f"{self.config.host}:{self.port}",
            services=self.service_names,
            metrics_port=self.config.metrics_port or None,
            internal_tls=tls.enabled,
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, wait for in-flight ones, run hooks."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.shutdown_grace if grace is None else grace)
        for hook in self._hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed", hook=getattr(hook, "__qualname__", "?"))
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then drain."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # Health turns NOT_SERVING first while requests are still served, so the gateway's
        # health checks (every second) send new ones elsewhere before any is refused.
        log.info("draining", delay=self.config.drain_delay)
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay > 0:
            await asyncio.sleep(self.config.drain_delay)
        await self.stop()
