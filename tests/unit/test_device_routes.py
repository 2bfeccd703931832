"""The device listener's routes are the permission table: rendered from the contracts'
per-method permissions and the certificate grant, with the same `grants` as the key check."""

from __future__ import annotations

from typing import Any

import yaml
from google.protobuf import descriptor_pool

from deploy.devstack.gateway import device_routes
from key_service.authz import PUBLIC_SERVICES
from key_service.permissions import API_ACCESS, CERTIFICATE_PERMISSIONS, grants
from shared.identity import (
    AUTHORIZED_METHOD_HEADER,
    CERT_NAMES_HEADER,
    PERMISSIONS_HEADER,
    method_policy,
)


def _routes() -> dict[str, dict[str, Any]]:
    # The anchors the template defines are not part of the snippet.
    text = device_routes().replace("*read_retries", "{}")
    routes: list[dict[str, Any]] = yaml.safe_load(text)
    return {route["match"]["path"]: route for route in routes}


def test_each_public_method_is_routed_or_refused_as_the_key_check_would_decide() -> None:
    routes = _routes()
    held = frozenset(CERTIFICATE_PERMISSIONS)
    required_by: dict[str, tuple[str, ...]] = {}
    for name in PUBLIC_SERVICES:
        for method in descriptor_pool.Default().FindServiceByName(name).methods:
            policy = method_policy(f"/{name}/{method.name}")
            if policy is not None:  # what the key check requires, plus api:access
                required_by[policy.full_method] = (policy.permission, API_ACCESS)
    assert sorted(routes) == sorted(required_by)
    for path, required in required_by.items():
        route = routes[path]
        if grants(held, required):
            headers = {
                h["header"]["key"]: h["header"]["value"] for h in route["request_headers_to_add"]
            }
            assert headers[AUTHORIZED_METHOD_HEADER] == path
            assert headers[CERT_NAMES_HEADER] == "%DOWNSTREAM_PEER_DNS_SAN%"
            assert headers[PERMISSIONS_HEADER] == ",".join(CERTIFICATE_PERMISSIONS)
        else:
            assert route["direct_response"]["status"] == 403
            missing = [p for p in required if p not in held]
            assert all(p in route["direct_response"]["body"]["inline_string"] for p in missing)


def test_a_certificate_reads_renews_and_revokes_but_manages_no_key() -> None:
    routes = _routes()
    cert = "/myl.cert.v1.CertificateService/"
    for method in ("GetCertificate", "RenewCertificate", "RevokeCertificate", "GetRenewalInfo"):
        assert "route" in routes[cert + method], method
    for path in (cert + "DeleteDevice", cert + "ListCertificates"):
        assert "direct_response" in routes[path], path
    assert all("direct_response" in r for p, r in routes.items() if ".key.v1." in p)
