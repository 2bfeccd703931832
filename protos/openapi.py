"""The OpenAPI 3 document of the REST surface, written from the contracts' descriptor set.

`generate.py` calls `openapi_document(descriptor_set_bytes)` after it has built
`deploy/envoy/myl.pb` and writes `deploy/envoy/openapi.json`, which the gateway serves at
`GET /openapi.json`. It is derived only from the descriptors (with source info, for the
comments), so it cannot drift from what the transcoder does:

- one operation per `google.api.http` rule of the public services; path variables become
  path parameters, the other request fields query parameters (GET, DELETE) or the JSON body
  (`body: "*"`, without the path-bound fields, unknown fields refused as the gateway does);
- names as proto3 JSON writes them (lowerCamelCase), enums as their value names, 64-bit
  integers as decimal strings, Timestamp as RFC 3339, Duration as `"<seconds>s"`;
- `REQUIRED` field behaviour becomes `required`;
- every route needs the `X-API-Key` header; the permission it needs (`myl.auth.v1`) is in
  its description and in `x-required-permission`;
- errors are `google.rpc.Status` (the gateway's and the services' alike).

Why our own: the maintained generators of OpenAPI 3 from `google.api.http` annotations
(gnostic's `protoc-gen-openapi`, connect's `protoc-gen-connect-openapi`) are Go programs with
no PyPI or npm distribution, and there is no Go toolchain here; grpc-gateway's
`protoc-gen-openapiv2` writes Swagger 2.0, not OpenAPI 3.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Final

from google.api import annotations_pb2, field_behavior_pb2  # type: ignore[attr-defined]
from google.protobuf import descriptor_pb2

from myl.auth.v1 import auth_pb2

PUBLIC_SERVICES: Final = ("myl.cert.v1.CertificateService", "myl.key.v1.ApiKeyService")
_T = descriptor_pb2.FieldDescriptorProto
_SCALARS: Final[dict[int, dict[str, Any]]] = {
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "format": "byte"},
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _T.TYPE_FLOAT: {"type": "number", "format": "float"},
    _T.TYPE_INT32: {"type": "integer", "format": "int32"},
    _T.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _T.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _T.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    _T.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    # proto3 JSON writes 64-bit integers as strings.
    _T.TYPE_INT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"},
    _T.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"},
    _T.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"},
    _T.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$"},
    _T.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$"},
}
_WELL_KNOWN: Final[dict[str, dict[str, Any]]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {
        "type": "string",
        "pattern": "^-?[0-9]{1,12}(\\.[0-9]{1,9})?s$",
        "example": "3600s",
    },
}
_STATUS: Final = {
    "type": "object",
    "description": "google.rpc.Status: the error shape of every failed call.",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code"},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "description": "google.rpc.ErrorInfo (reason, domain, metadata), "
            "google.rpc.BadRequest (fieldViolations), google.rpc.RetryInfo...",
            "items": {
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": True,
            },
        },
    },
    "required": ["code", "message"],
}
_HTTP_BODY: Final = ".google.api.HttpBody"
_PUBLIC_CONTENT_TYPES: Final = {
    "GetCrl": "application/pkix-crl",
    "GetIssuerCertificate": "application/pkix-cert",
}
_ERRORS: Final = {
    "400": "Bad input: a field, the JSON body or the URL (BadRequest names it).",
    "401": "No API key, or an unknown, expired or revoked one.",
    "403": "The key lacks the permission, or acts on another device.",
    "404": "No such resource, or no such route.",
    "413": "Request body larger than 64 KiB.",
    "429": "Rate limit of the key; see Retry-After.",
    "431": "More than 80 request headers, or request line and headers over 8 KiB.",
}


def _comments(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[tuple[str, ...], str]:
    """Leading comments by (file, path...) of the source code locations."""
    found: dict[tuple[str, ...], str] = {}
    for f in files:
        for location in f.source_code_info.location:
            text = location.leading_comments.strip()
            if text:
                found[(f.name, *map(str, location.path))] = " ".join(text.split())
    return found


class _Builder:
    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.comments = _comments(files)
        self.messages: dict[str, tuple[descriptor_pb2.DescriptorProto, tuple[str, ...]]] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.services: dict[str, tuple[descriptor_pb2.ServiceDescriptorProto, str, int]] = {}
        for f in files:
            prefix = f".{f.package}" if f.package else ""
            for index, message in enumerate(f.message_type):
                self._add_message(message, prefix, (f.name, "4", str(index)))
            for enum in f.enum_type:
                self.enums[f"{prefix}.{enum.name}"] = enum
            for index, service in enumerate(f.service):
                self.services[f"{f.package}.{service.name}"] = (service, f.name, index)
        self.schemas: dict[str, Any] = {"google.rpc.Status": _STATUS}

    def _add_message(
        self, message: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[str, ...]
    ) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = (message, path)
        for index, nested in enumerate(message.nested_type):
            self._add_message(nested, name, (*path, "3", str(index)))
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum

    def field_schema(
        self, field: descriptor_pb2.FieldDescriptorProto, request: bool = False
    ) -> dict[str, Any]:
        """The JSON schema of a field. Responses use the one form the gateway prints;
        requests (`request`) accept every form the proto3 JSON parser accepts: enum
        numbers beside names, integers as strings."""
        if field.type == _T.TYPE_ENUM:
            enum = self.enums[field.type_name]
            single: dict[str, Any] = {"type": "string", "enum": [v.name for v in enum.value]}
            if request:
                numbers = {"type": "integer", "enum": [v.number for v in enum.value]}
                single = {"anyOf": [single, numbers]}
        elif field.type == _T.TYPE_MESSAGE:
            if field.type_name in _WELL_KNOWN:
                single = dict(_WELL_KNOWN[field.type_name])
            else:
                single = {"$ref": f"#/components/schemas/{self.ref(field.type_name)}"}
        else:
            single = dict(_SCALARS[field.type])
            if request and single.get("type") == "integer":
                single = {"anyOf": [single, {"type": "string", "pattern": "^-?[0-9]{1,10}$"}]}
        if field.label == _T.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single

    def ref(self, type_name: str) -> str:
        """The component name of a message (its full name), built on first use."""
        name = type_name.lstrip(".")
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: messages may refer to themselves
            self.schemas[name] = self.object_schema(type_name, exclude=(), closed=False)
        return name

    def object_schema(
        self, type_name: str, exclude: tuple[str, ...], closed: bool
    ) -> dict[str, Any]:
        message, path = self.messages[type_name]
        properties: dict[str, Any] = {}
        required: list[str] = []
        for index, field in enumerate(message.field):
            if field.name in exclude:
                continue
            property_schema = self.field_schema(field, request=closed)
            comment = self.comments.get((*path, "2", str(index)))
            if comment and "$ref" not in property_schema:
                property_schema = {**property_schema, "description": comment}
            if closed:
                # proto3 JSON reads null as "not set".
                property_schema = (
                    {**property_schema, "nullable": True}
                    if "$ref" not in property_schema
                    else {"allOf": [property_schema], "nullable": True}
                )
            properties[field.json_name] = property_schema
            behaviors = field.options.Extensions[field_behavior_pb2.field_behavior]
            if field_behavior_pb2.REQUIRED in behaviors:
                required.append(field.json_name)
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        comment = self.comments.get(path)
        if comment:
            schema["description"] = comment
        if closed:
            schema["additionalProperties"] = False
        return schema

    def operations(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for service_name in PUBLIC_SERVICES:
            service, file_name, service_index = self.services[service_name]
            for index, method in enumerate(service.method):
                permission = method.options.Extensions[auth_pb2.required_permission]
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                template = getattr(rule, verb)
                comment = self.comments.get((file_name, "6", str(service_index), "2", str(index)))
                if not permission:
                    if method.output_type == _HTTP_BODY:
                        yield verb, template, self.public_operation(service_name, method, comment)
                    continue
                yield (
                    verb,
                    template,
                    self.operation(service_name, method, rule.body, template, permission, comment),
                )

    def public_operation(
        self, service_name: str, method: descriptor_pb2.MethodDescriptorProto, comment: str | None
    ) -> dict[str, Any]:
        """A route of the public repository (CRLs, the CA certificate): no key, raw bytes."""
        content_type = _PUBLIC_CONTENT_TYPES[method.name]
        status_ref = {"$ref": "#/components/schemas/google.rpc.Status"}
        request, _ = self.messages[method.input_type]
        operation: dict[str, Any] = {
            "operationId": method.name,
            "tags": ["PublicRepository"],
            "summary": method.name,
            "description": f"{comment + ' ' if comment else ''}No API key. GET only (HEAD "
            "is not served: 404); query parameters are refused (400).",
            "security": [],
            "x-grpc-method": f"/{service_name}/{method.name}",
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {content_type: {"schema": {"type": "string", "format": "binary"}}},
                },
                "400": {
                    "description": "A malformed file name or a query parameter.",
                    "content": {"application/json": {"schema": status_ref}},
                },
                "404": {
                    "description": "No such file.",
                    "content": {"application/json": {"schema": status_ref}},
                },
                "default": {
                    "description": "Any other error (503 when the service is unavailable).",
                    "content": {"application/json": {"schema": status_ref}},
                },
            },
        }
        parameters = [
            {"name": field.json_name, "in": "path", "required": True, "schema": {"type": "string"}}
            for field in request.field
        ]
        if parameters:
            operation["parameters"] = parameters
        return operation

    def operation(
        self,
        service_name: str,
        method: descriptor_pb2.MethodDescriptorProto,
        body: str,
        template: str,
        permission: str,
        comment: str | None,
    ) -> dict[str, Any]:
        request, _ = self.messages[method.input_type]
        by_name = {f.name: f for f in request.field}
        bound = re.findall(r"\{([a-z_][a-z0-9_]*)(?:=\*)?\}", template)
        parameters: list[dict[str, Any]] = [
            {
                "name": by_name[name].json_name,
                "in": "path",
                "required": True,
                "schema": self.field_schema(by_name[name], request=True),
            }
            for name in bound
        ]
        scope = (
            " A device key acts only on its own device."
            if method.options.Extensions[auth_pb2.device_scoped]
            else ""
        )
        description = f"{comment + ' ' if comment else ''}Needs permission `{permission}`.{scope}"
        operation: dict[str, Any] = {
            "operationId": method.name,
            "tags": [service_name.rsplit(".", 1)[1]],
            "summary": method.name,
            "description": description,
            "x-required-permission": permission,
            "x-grpc-method": f"/{service_name}/{method.name}",
        }
        if body == "*":
            operation["requestBody"] = {
                # No body at all is read as {}.
                "required": False,
                "content": {
                    "application/json": {
                        "schema": self.object_schema(
                            method.input_type, exclude=tuple(bound), closed=True
                        )
                    }
                },
            }
        else:
            for field in request.field:
                if field.name in bound:
                    continue
                schema = self.field_schema(field, request=True)
                if "$ref" in schema or schema.get("items", {}).get("$ref"):
                    continue  # message fields cannot be query parameters
                parameters.append({"name": field.json_name, "in": "query", "schema": schema})
        if parameters:
            operation["parameters"] = parameters
        status_ref = {"$ref": "#/components/schemas/google.rpc.Status"}
        operation["responses"] = {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{self.ref(method.output_type)}"}
                    }
                },
            },
            **{
                code: {"description": text, "content": {"application/json": {"schema": status_ref}}}
                for code, text in _ERRORS.items()
            },
            "default": {
                "description": "Any other error (503 when a service is unavailable, ...).",
                "content": {"application/json": {"schema": status_ref}},
            },
        }
        return operation


def openapi_document(descriptor_set: bytes) -> dict[str, Any]:
    files = list(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file)
    builder = _Builder(files)
    paths: dict[str, dict[str, Any]] = {}
    for verb, template, operation in builder.operations():
        path = re.sub(
            r"\{([a-z_][a-z0-9_]*)(?:=\*)?\}",
            lambda m: "{" + _json_name(m.group(1)) + "}",
            template,
        )
        paths.setdefault(path, {})[verb] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "myl device identity",
            "version": "v1",
            "description": "Device certificates and API keys, REST over the gateway "
            "(the same methods are native gRPC on the same port). Every /api route needs "
            "an X-API-Key header and names the permission it needs; the /pki routes (CRLs "
            "and the issuing CA certificate, for relying parties) need no key. Errors are "
            "google.rpc.Status JSON.",
        },
        "servers": [{"url": "/"}],
        "security": [{"ApiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": dict(sorted(builder.schemas.items())),
        },
    }


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def render(descriptor_set: bytes) -> str:
    return json.dumps(openapi_document(descriptor_set), indent=2, sort_keys=False) + "\n"
