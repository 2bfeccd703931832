"""The public edge through the real gateway: every bad request gets a clear 4xx.

Each test is one thing a device developer or an attacker tried; the assertions are what
they see (status, body, headers) and what reaches the logs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import device_key, operator_key, provision
from tests.fixtures.key import RunningKeyService


def error_reason(body: dict[str, object]) -> str:
    details = body.get("details")
    assert isinstance(details, list), body
    return next(str(d["reason"]) for d in details if str(d["@type"]).endswith("ErrorInfo"))


async def test_rotation_cannot_obtain_what_the_caller_may_not_grant(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        await provision(client, gateway, admin, "dev-rot")
        weak = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["device:read", "device:write", "api:access"], rateLimit=100,
        )  # fmt: skip
        strong = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["ssl:read", "ssl:write", "api:access"], rateLimit=1_000_000,
        )  # fmt: skip
        fast = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["device:read", "api:access"], rateLimit=5000,
        )  # fmt: skip
        weak_key = {"X-API-Key": weak["apiKey"]}

        stronger = await client.post(
            f"/api/v1/keys/{strong['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert stronger.status_code == 403, stronger.text
        assert error_reason(stronger.json()) == "PERMISSION_NOT_GRANTABLE"
        assert "ssl:write" in stronger.json()["message"]
        assert "apiKey" not in stronger.json()

        faster = await client.post(
            f"/api/v1/keys/{fast['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert faster.status_code == 403, faster.text
        assert error_reason(faster.json()) == "RATE_LIMIT_NOT_GRANTABLE"

        # Both keys are untouched and still work.
        for key in (strong, fast):
            got = await client.get(f"/api/v1/keys/{key['key']['keyId']}", headers=weak_key)
            assert got.json()["key"]["status"] == "API_KEY_STATUS_ACTIVE", got.text

        # A key it could have granted itself it may rotate; the new key does not outlive it.
        peer = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["device:read", "api:access"], rateLimit=10,
            expireTime=(datetime.now(UTC) + timedelta(days=3000)).isoformat(),
        )  # fmt: skip
        rotated = await client.post(
            f"/api/v1/keys/{peer['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["key"]["expireTime"] <= weak["key"]["expireTime"]
        assert rotated.json()["key"]["permissions"] == ["device:read", "api:access"]

        # Its own key, and the operator any key: as before.
        own = await client.post(
            f"/api/v1/keys/{weak['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert own.status_code == 200, own.text
        by_operator = await client.post(
            f"/api/v1/keys/{strong['key']['keyId']}:rotate",
            headers={"X-API-Key": admin},
            json={},
        )
        assert by_operator.status_code == 200, by_operator.text
        assert by_operator.json()["key"]["rateLimit"] == 1_000_000
