"""REST routes of the contracts: which gRPC method a REST call is for, and which
fields of its JSON body the method does not know.

The gateway checks a REST call's key before its transcoder reads the body (so a call without
a key is 401 whatever its body), and so before the transcoder has turned the REST path into
the gRPC method path. key_service's check resolves the method itself, from the same
`google.api.http` rules the transcoder uses:

- the path is matched without its query string, segment by segment;
- a `:verb` after the last `/` is the custom verb (`/api/v1/keys/{key_id}:rotate`), as in
  the transcoder, which treats a colon in the last segment as a verb whether or not any
  route registers it;
- `{name}` (or `{name=*}`) matches one whole segment, anything else matches literally.

Only the template features the contracts use are supported (`build` refuses others), so the
check cannot disagree with the transcoder about which method a path names. When it finds no
method the gateway answers 404, as the transcoder would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from google.api import annotations_pb2, http_pb2  # type: ignore[attr-defined]
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VERBS: Final = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class HttpRoute:
    http_method: str
    segments: tuple[str | None, ...]  # None: a variable, one segment
    verb: str
    grpc_path: str  # /package.Service/Method


def _split_verb(path: str) -> tuple[str, str]:
    slash = path.rfind("/")
    colon = path.find(":", slash + 1)
    if colon < 0:
        return path, ""
    return path[:colon], path[colon + 1 :]


def _parse(template: str, full_method: str) -> tuple[tuple[str | None, ...], str]:
    if not template.startswith("/"):
        raise ValueError(f"{full_method}: path template must start with /: {template!r}")
    path, verb = _split_verb(template)
    segments: list[str | None] = []
    for segment in path[1:].split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            name, _, pattern = segment[1:-1].partition("=")
            if pattern not in ("", "*") or not name:
                raise ValueError(f"{full_method}: unsupported variable {segment!r}")
            segments.append(None)
        elif "{" in segment or "}" in segment or "*" in segment or not segment:
            raise ValueError(f"{full_method}: unsupported segment {segment!r}")
        else:
            segments.append(segment)
    return tuple(segments), verb


def _rules(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


class HttpRoutes:
    """The REST routes of some gRPC services, looked up by HTTP method and path."""

    def __init__(self, routes: Iterable[HttpRoute]) -> None:
        self._by_shape: dict[tuple[str, int, str], list[HttpRoute]] = {}
        # Literal segments before variables, segment by segment, as the transcoder prefers.
        for route in sorted(routes, key=lambda r: tuple(s is None for s in r.segments)):
            key = (route.http_method, len(route.segments), route.verb)
            self._by_shape.setdefault(key, []).append(route)

    @classmethod
    def build(cls, service_names: Iterable[str]) -> HttpRoutes:
        pool = descriptor_pool.Default()
        routes = []
        for name in service_names:
            for method in pool.FindServiceByName(name).methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                grpc_path = f"/{method.containing_service.full_name}/{method.name}"
                for rule in _rules(options.Extensions[annotations_pb2.http]):
                    kind = rule.WhichOneof("pattern")
                    if kind not in _VERBS:
                        raise ValueError(f"{method.full_name}: unsupported HTTP rule {kind}")
                    segments, verb = _parse(getattr(rule, kind), method.full_name)
                    routes.append(HttpRoute(kind.upper(), segments, verb, grpc_path))
        return cls(routes)

    def allowed_methods(self, path: str) -> list[str]:
        """The HTTP methods some route accepts for `path` (for 405 and `Allow`)."""
        path = path.split("?", 1)[0]
        return sorted(
            {
                method
                for (method, _, _) in self._by_shape
                if method in ("GET", "POST", "PUT", "DELETE", "PATCH")
                and self.grpc_path(method, path) is not None
            }
        )

    def grpc_path(self, http_method: str, path: str) -> str | None:
        """The gRPC method path for this REST call, or None when no route matches."""
        path = path.split("?", 1)[0]
        if not path.startswith("/"):
            return None
        path, verb = _split_verb(path)
        segments = path[1:].split("/")
        for route in self._by_shape.get((http_method.upper(), len(segments), verb), ()):
            if all(
                want is None or want == got
                for want, got in zip(route.segments, segments, strict=True)
            ):
                return route.grpc_path
        return None


def _is_well_known(descriptor: Descriptor) -> bool:
    """Messages proto3 JSON writes as scalars or free-form values (Timestamp, Struct...)."""
    return descriptor.full_name.startswith("google.protobuf.")


def unknown_json_fields(descriptor: Descriptor, body: str) -> list[str]:
    """Fields of a JSON request body that `descriptor` does not have, as dotted paths.

    The transcoder follows the proto3 JSON mapping, which ignores unknown fields: a
    misspelled `expiresAt` would silently leave `expireTime` at its default. Both spellings
    the mapping accepts (lowerCamelCase and the proto name) are known. A body that is not a
    JSON object is left to the transcoder, which answers it with 400.
    """
    try:
        value = json.loads(body)
    except ValueError:
        return []
    found: list[str] = []
    _walk(descriptor, value, "", found)
    return found


def _walk(descriptor: Descriptor, value: object, prefix: str, found: list[str]) -> None:
    if not isinstance(value, dict):
        return
    for name, item in value.items():
        field = descriptor.fields_by_name.get(name) or _by_json_name(descriptor, name)
        if field is None:
            found.append(f"{prefix}{name}")
            continue
        message = field.message_type
        if message is None or _is_well_known(message) or message.GetOptions().map_entry:
            continue
        items = item if isinstance(item, list) else [item]
        for index, element in enumerate(items):
            where = f"{prefix}{name}[{index}]." if isinstance(item, list) else f"{prefix}{name}."
            _walk(message, element, where, found)


def _by_json_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    for field in descriptor.fields:
        if field.json_name == name:
            return field
    return None
