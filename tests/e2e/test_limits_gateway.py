"""A limit's refusal through the real gateway: 429, Retry-After, the limit named in the body."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import OPERATOR, provision
from tests.fixtures.cert import RunningCertService, StartCertService
from tests.fixtures.key import RunningKeyService

LIMITS = """
overrides:
  - CertificatesPerDeviceName: {burst: 1, count: 1, period: 24h, ids: [gw-limited.myl.zip]}
"""


@pytest.fixture
async def cert_service(start_cert_service: StartCertService, tmp_path: Path) -> RunningCertService:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    return await start_cert_service(LIMITS_FILE=str(path))


async def test_an_early_renewal_over_the_limit_is_429_with_retry_after(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin, _ = await key_service.issue_device_key(None, permissions=OPERATOR)
    async with httpx.AsyncClient(timeout=10) as client:
        await provision(client, gateway, admin, "gw-limited")
        reply = await client.post(
            f"{gateway.url}/api/v1/devices/gw-limited/certificate:renew",
            headers={"X-API-Key": admin},
            json={},
        )
    assert reply.status_code == 429, reply.text
    assert reply.headers["retry-after"] == str(24 * 3600)
    body = reply.json()
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "CERTIFICATES_PER_DEVICE_NAME_EXCEEDED"
    assert info["metadata"] == {"limit": "CertificatesPerDeviceName", "id": "gw-limited.myl.zip"}
    retry = next(d for d in body["details"] if d["@type"].endswith("RetryInfo"))
    assert retry["retryDelay"] == f"{24 * 3600}s"
