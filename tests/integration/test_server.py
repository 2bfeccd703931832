"""The shared server builder: error mapping, health, reflection, drain."""

from __future__ import annotations

import asyncio
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.rpc import code_pb2, error_details_pb2  # type: ignore[attr-defined]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from shared.config import ServerConfig
from shared.errors import invalid_argument
from shared.server import GrpcServer

GRPCURL = Path(sys.executable).parent / "grpcurl"


async def _bad_input(request: Any, context: Any) -> empty_pb2.Empty:
    raise invalid_argument("device_id", "must not be empty")


async def _bug(request: Any, context: Any) -> empty_pb2.Empty:
    raise RuntimeError("secret internal detail")


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=empty_pb2.Empty.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString,
        )
        for name, fn in (("BadInput", _bad_input), ("Bug", _bug))
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Demo", handlers),))


@pytest.fixture
async def demo_server() -> AsyncIterator[GrpcServer]:
    # Plaintext (the local debugging switch): what is tested here is not the transport.
    config = ServerConfig.from_env("demo", 0, 0, {"ENVIRONMENT": "test", "INTERNAL_TLS": "off"})
    server = GrpcServer(config)
    server.add_service("demo.Demo", _register)
    await server.start()
    yield server
    await server.stop(grace=0.5)


async def _call(port: int, method: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            f"/demo.Demo/{method}",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(empty_pb2.Empty(), metadata=(("x-request-id", "req-123"),))
        return caught.value


def _details(error: grpc.aio.AioRpcError) -> Any:
    class _Call:
        def code(self) -> grpc.StatusCode:
            return error.code()

        def details(self) -> str | None:
            return error.details()

        def trailing_metadata(self) -> Any:
            return error.trailing_metadata()

    return rpc_status.from_call(_Call())  # type: ignore[arg-type]


async def test_domain_error_becomes_invalid_argument_with_field(demo_server: GrpcServer) -> None:
    error = await _call(demo_server.port, "BadInput")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = _details(error)
    assert status.code == code_pb2.INVALID_ARGUMENT
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "myl.zip"
    assert status.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("device_id", "must not be empty")
    ]


async def test_unexpected_exception_is_a_bare_internal(demo_server: GrpcServer) -> None:
    error = await _call(demo_server.port, "Bug")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    assert "secret" not in str(error.debug_error_string())
    assert "Traceback" not in (error.details() or "")


async def test_health_reflection_and_drain(demo_server: GrpcServer) -> None:
    address = f"127.0.0.1:{demo_server.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "demo.Demo"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The server runs on this event loop: the client must not block it.
    grpcurl = await asyncio.create_subprocess_exec(
        str(GRPCURL), "-plaintext", address, "list", stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(grpcurl.communicate(), 30)
    assert grpcurl.returncode == 0, err
    assert {"demo.Demo", "grpc.health.v1.Health"} <= set(out.decode().split())

    await demo_server.stop(grace=0.5)
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
