"""REST routes of the contracts: which gRPC method a REST call is for, and what in its URL
and JSON body the method would get wrong.

The gateway checks a REST call's key before its transcoder reads the body (so a call without
a key is 401 whatever its body), and so before the transcoder has turned the REST path into
the gRPC method path. key_service's check resolves the method itself, from the same
`google.api.http` rules the transcoder uses:

- the path is matched without its query string, segment by segment;
- a `:verb` after the last `/` is the custom verb (`/api/v1/keys/{key_id}:rotate`), as in
  the transcoder, which treats a colon in the last segment as a verb whether or not any
  route registers it;
- `{name}` (or `{name=*}`) matches one whole segment, anything else matches literally.

Two parsers reading one request are two chances to disagree, so the check only resolves
*canonical* paths and refuses the rest (`non_canonical`): an empty segment (a trailing slash,
`//`), a dot segment, a percent escape, `;` parameters or a backslash. The transcoder reads
`/api/v1/ssl/certificates/` as the list route while a segment-by-segment match reads it as
a lookup of the name `""`; no legitimate name needs any of these characters (device ids,
names and key ids are refused with them by the services anyway). Whatever slips through, the
services refuse a call whose executed method is not the one the check authorized
(`shared.identity.AUTHORIZED_METHOD_HEADER`): the method is decided once, here, and enforced
where it runs.

Only the template features the contracts use are supported (`build` refuses others). When
it finds no method the gateway answers 404, as the transcoder would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from google.api import annotations_pb2, http_pb2  # type: ignore[attr-defined]
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VERBS: Final = ("get", "put", "post", "delete", "patch")
# Deeper JSON than any request message needs; refused before anything recurses into it.
MAX_JSON_DEPTH: Final = 32
_FORBIDDEN_IN_SEGMENT: Final = ("%", ";", "\\")


@dataclass(frozen=True)
class HttpRoute:
    http_method: str
    segments: tuple[str | None, ...]  # None: a variable, one segment
    verb: str
    grpc_path: str  # /package.Service/Method
    # The request field each variable binds, by segment index.
    variables: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class RouteMatch:
    """A REST call resolved: the method, and the value of each path variable."""

    grpc_path: str
    bound: tuple[tuple[str, str], ...]  # (field name, value from the path)


class RequestProblem(ValueError):
    """A REST request the gateway refuses before any service: what is wrong, and where
    (`field` is a dotted field path, `path`, `url` or `body`)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


def _split_verb(path: str) -> tuple[str, str]:
    slash = path.rfind("/")
    colon = path.find(":", slash + 1)
    if colon < 0:
        return path, ""
    return path[:colon], path[colon + 1 :]


def _parse(
    template: str, full_method: str
) -> tuple[tuple[str | None, ...], str, tuple[tuple[int, str], ...]]:
    if not template.startswith("/"):
        raise ValueError(f"{full_method}: path template must start with /: {template!r}")
    path, verb = _split_verb(template)
    segments: list[str | None] = []
    variables: list[tuple[int, str]] = []
    for index, segment in enumerate(path[1:].split("/")):
        if segment.startswith("{") and segment.endswith("}"):
            name, _, pattern = segment[1:-1].partition("=")
            if pattern not in ("", "*") or not name or "." in name:
                raise ValueError(f"{full_method}: unsupported variable {segment!r}")
            segments.append(None)
            variables.append((index, name))
        elif "{" in segment or "}" in segment or "*" in segment or not segment:
            raise ValueError(f"{full_method}: unsupported segment {segment!r}")
        else:
            segments.append(segment)
    return tuple(segments), verb, tuple(variables)


def _rules(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def non_canonical(path: str) -> tuple[int, str] | None:
    """(segment index, why) when `path` (without its query) is not canonical, else None."""
    if path in ("", "/"):
        return None  # No route; the caller answers 404.
    if not path.startswith("/"):
        return 0, "must start with /"
    for index, segment in enumerate(path[1:].split("/")):
        if not segment:
            return index, "has an empty segment (a trailing or doubled slash)"
        if segment in (".", ".."):
            return index, "has a dot segment"
        if any(c in segment for c in _FORBIDDEN_IN_SEGMENT):
            return index, "has a percent escape, a ';' parameter or a backslash"
    return None


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
                    if kind in _VERBS:
                        http_method, template = kind.upper(), getattr(rule, kind)
                    else:
                        raise ValueError(f"{method.full_name}: unsupported HTTP rule {kind}")
                    segments, verb, variables = _parse(template, method.full_name)
                    for _, field in variables:
                        if field not in method.input_type.fields_by_name:
                            raise ValueError(f"{method.full_name}: no field {field!r}")
                    routes.append(HttpRoute(http_method, segments, verb, grpc_path, variables))
        return cls(routes)

    @property
    def routes(self) -> list[HttpRoute]:
        return [route for shape in self._by_shape.values() for route in shape]

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

    def match(self, http_method: str, path: str) -> RouteMatch | None:
        """The route for this REST call (query ignored), or None when none matches."""
        path = path.split("?", 1)[0]
        if not path.startswith("/"):
            return None
        route = self._route_of(http_method, path)
        if route is None:
            return None
        segments = _split_verb(path)[0][1:].split("/")
        bound = tuple((field, segments[index]) for index, field in route.variables)
        return RouteMatch(route.grpc_path, bound)

    def resolve(self, http_method: str, path: str) -> RouteMatch | None:
        """The route for a canonical REST path (query ignored), None when none matches;
        `RequestProblem` for a path that is not canonical, naming the path variable's field
        when the offending segment is one (`/devices/dev%ff/keys`: `device_id`)."""
        path = path.split("?", 1)[0]
        bad = non_canonical(path)
        if bad is None:
            return self.match(http_method, path)
        index, why = bad
        route = self._route_of(http_method, path) if path.startswith("/") else None
        if route is not None and why.startswith("has a percent"):
            # A name with a character no name may carry: the name's field is what is wrong.
            field = dict(route.variables).get(index)
            if field is not None:
                raise RequestProblem(field, why.replace("has a", "must not contain a", 1))
        raise RequestProblem("path", why)

    def _route_of(self, http_method: str, path: str) -> HttpRoute | None:
        path, verb = _split_verb(path)
        segments = path[1:].split("/")
        for route in self._by_shape.get((http_method.upper(), len(segments), verb), ()):
            if all(
                want is None or want == got
                for want, got in zip(route.segments, segments, strict=True)
            ):
                return route
        return None

    def grpc_path(self, http_method: str, path: str) -> str | None:
        """The gRPC method path for this REST call, or None when no route matches."""
        found = self.match(http_method, path)
        return None if found is None else found.grpc_path


def _is_well_known(descriptor: Descriptor) -> bool:
    """Messages proto3 JSON writes as scalars or free-form values (Timestamp, Struct...)."""
    return descriptor.full_name.startswith("google.protobuf.")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for name, value in pairs:
        if name in found:
            raise RequestProblem("body", f"field {name!r} appears twice in one object")
        found[name] = value
    return found


def _no_constant(name: str) -> object:
    raise RequestProblem("body", f"{name} is not JSON (RFC 8259)")


def parse_json_body(body: str) -> object:
    """The body as RFC 8259 JSON, strictly: no single quotes, trailing commas, comments,
    NaN or duplicate names, at most `MAX_JSON_DEPTH` levels deep. `RequestProblem` naming
    `body` otherwise. (The transcoder's parser is lenient: a body it reads differently from
    this check must never reach it.)"""
    # Bounded before the parser recurses (nesting needs one bracket per level, so the
    # scan runs only for bodies with many brackets).
    if body.count("[") + body.count("{") > MAX_JSON_DEPTH and _bracket_depth(body) > (
        MAX_JSON_DEPTH
    ):
        raise RequestProblem("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RequestProblem:
        raise
    except (ValueError, RecursionError) as err:
        raise RequestProblem("body", f"not valid JSON (RFC 8259): {err}") from None
    return value


def _bracket_depth(body: str) -> int:
    """The deepest bracket nesting outside strings (an upper bound of the JSON depth)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in body:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


class UnknownFields(RequestProblem):
    """Body fields the method does not have, as dotted paths."""

    def __init__(self, fields: list[str]) -> None:
        super().__init__(fields[0], "unknown field")
        self.fields = fields


def check_rest_request(descriptor: Descriptor, route: RouteMatch, query: str, body: str) -> None:
    """Refuse, with `RequestProblem` naming the field, what the transcoder would get wrong:

    - a body that is not strict JSON (see `parse_json_body`);
    - a body field the method does not have (the proto3 JSON mapping drops it silently: a
      misspelled `expiresAt` would leave `expireTime` at its default);
    - a body or query field that names another object than the path does
      (`{"deviceId": "B"}` sent to `/devices/A/...`), in either spelling of its name.

    Both spellings the mapping accepts (lowerCamelCase and the proto name) are known.
    """
    bound = dict(route.bound)
    for name, given in parse_qsl(query, keep_blank_values=True):
        field = _field(descriptor, name.split(".", 1)[0])
        if field is not None and field.name in bound and given != bound[field.name]:
            raise RequestProblem(name, f"names {given!r}, but the path names {bound[field.name]!r}")
    if not body.strip():
        return
    value = parse_json_body(body)
    if not isinstance(value, dict):
        return  # The transcoder answers a body that is not an object with 400.
    for name, item in value.items():
        field = _field(descriptor, name)
        if field is not None and field.name in bound and item != bound[field.name]:
            raise RequestProblem(name, f"names {item!r}, but the path names {bound[field.name]!r}")
    found: list[str] = []
    _walk(descriptor, value, "", found)
    if found:
        raise UnknownFields(found)


_STRING_TYPES: Final = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES})
_INTEGER_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
# Well-known types written as JSON strings, and how.
_STRING_WELL_KNOWN: Final = {
    "google.protobuf.Timestamp": 'must be an RFC 3339 string, e.g. "2030-01-01T00:00:00Z"',
    "google.protobuf.Duration": 'must be a duration string, e.g. "3600s"',
    "google.protobuf.FieldMask": "must be a string of comma-separated field names",
}


def _wrong_shape(field: FieldDescriptor, value: object) -> str | None:
    """What is wrong with `value` as one (non-repeated) value of `field`, if its JSON type
    cannot be what the proto3 JSON mapping accepts. `null` is left to the transcoder."""
    if value is None:
        return None
    message = field.message_type
    if message is not None:
        if message.full_name in _STRING_WELL_KNOWN:
            return None if isinstance(value, str) else _STRING_WELL_KNOWN[message.full_name]
        if _is_well_known(message):
            return None
        return None if isinstance(value, dict) else "must be a JSON object"
    if field.enum_type is not None:
        named = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        return None if named else "must be an enum value name (a JSON string)"
    if field.type in _STRING_TYPES:
        return None if isinstance(value, str) else "must be a JSON string"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return None if isinstance(value, bool) else "must be true or false"
    if field.type in _INTEGER_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | str):
            return "must be an integer"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return "must be a number"
    return None


def _walk(descriptor: Descriptor, value: object, prefix: str, found: list[str]) -> None:
    """Collect unknown fields into `found`; `RequestProblem` naming the first known field
    whose JSON type cannot be right (a list for a string, an object for a timestamp)."""
    if not isinstance(value, dict):
        return
    for name, item in value.items():
        field = _field(descriptor, name)
        if field is None:
            found.append(f"{prefix}{name}")
            continue
        repeated = field.is_repeated
        map_entry = field.message_type is not None and field.message_type.GetOptions().map_entry
        if repeated and not map_entry:
            if item is not None and not isinstance(item, list):
                raise RequestProblem(f"{prefix}{name}", "must be a JSON array")
            elements = item or []
        elif map_entry:
            if item is not None and not isinstance(item, dict):
                raise RequestProblem(f"{prefix}{name}", "must be a JSON object")
            continue
        else:
            elements = [item]
        for index, element in enumerate(elements):
            where = f"{prefix}{name}[{index}]" if repeated else f"{prefix}{name}"
            problem = _wrong_shape(field, element)
            if problem is not None:
                raise RequestProblem(where, problem)
            message = field.message_type
            if message is not None and not _is_well_known(message):
                _walk(message, element, f"{where}.", found)


def _field(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    field = descriptor.fields_by_name.get(name)
    if field is not None:
        return field
    for field in descriptor.fields:
        if field.json_name == name:
            return field
    return None
