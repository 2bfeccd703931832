"""Server reflection that answers for the whole public API through the gateway.

grpcio's reflection servicer lists the services a server registered and resolves a symbol
with `DescriptorPool.FindFileContainingSymbol`, which does not know method names: `grpcurl
describe myl.cert.v1.CertificateService.GetCertificate` failed with "Symbol not found" on
every port. This servicer

- resolves a symbol it cannot find by its parent (a method by its service, an enum value by
  its enum): the file is the same;
- lists, to callers that come through the gateway (the gateway's reflection route adds
  `x-myl-via-gateway`), the public services of both cert_service and key_service plus
  reflection itself: everything a gRPC user can call there. Health is not listed there: the
  gateway does not route it (`GET /healthz` is the gateway's health). Callers on a service's
  own port see that server's services, health and reflection, as before.

Both services' descriptors are in every server's pool (imported below), so either service
can answer for the other; the gateway sends reflection to cert_service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer as AioReflectionServicer

from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2

VIA_GATEWAY_HEADER: Final = "x-myl-via-gateway"
PUBLIC_SERVICES: Final = (
    cert_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
    reflection.SERVICE_NAME,
)


def _services(request: Any, names: Iterable[str]) -> reflection_pb2.ServerReflectionResponse:
    return reflection_pb2.ServerReflectionResponse(
        list_services_response=reflection_pb2.ListServiceResponse(
            service=[reflection_pb2.ServiceResponse(name=n) for n in sorted(names)]
        ),
        original_request=request,
    )


class ReflectionServicer(AioReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: Iterable[str]) -> None:
        super().__init__(service_names)
        self._own = tuple(sorted(service_names))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        name = fully_qualified_name
        while True:
            response = super()._file_containing_symbol(request, name)
            if not response.HasField("error_response") or "." not in name:
                return response
            name = name.rsplit(".", 1)[0]

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        metadata = context.invocation_metadata() or ()
        via_gateway = any(key == VIA_GATEWAY_HEADER for key, _ in metadata)
        names = PUBLIC_SERVICES if via_gateway else self._own

        async def one(request: Any) -> AsyncIterator[Any]:
            yield request

        async for request in request_iterator:
            if request.HasField("list_services"):
                yield _services(request, names)
                continue
            async for response in super().ServerReflectionInfo(one(request), context):
                yield response
