"""AIP-155 request ids over REST: what a client behind the gateway sees for a duplicate that
is still running, and for a retry whose key was revoked since (shared/idempotency.py)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg

from shared.idempotency import claim_lock_id
from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import device_key, operator_key, provision
from tests.fixtures.key import RunningKeyService


def detail(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(d for d in body["details"] if str(d["@type"]).endswith(kind))


async def test_a_duplicate_in_flight_is_409_with_retry_advice_and_a_superseded_retry_is_400(
    gateway: Gateway,
    key_service: RunningKeyService,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        await provision(client, gateway, admin, "dup-device")
        old = await device_key(client, gateway, admin, "dup-device")
        request_id = str(uuid.uuid4())
        rotate = f"/api/v1/keys/{old['key']['keyId']}:rotate"
        body = {"gracePeriod": "3600s", "requestId": request_id}
        headers = {"X-API-Key": admin}

        # An attempt of this request runs on another replica: it holds the request id.
        lock = claim_lock_id(uuid.UUID(request_id))
        await db_conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
        busy = await client.post(rotate, headers=headers, json=body)
        await db_conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))
        assert busy.status_code == 409, busy.text
        assert detail(busy.json(), "ErrorInfo")["reason"] == "REQUEST_IN_PROGRESS"
        assert detail(busy.json(), "RetryInfo")["retryDelay"] == "1s"
        assert "retry with the same request_id" in busy.json()["message"]

        rotated = await client.post(rotate, headers=headers, json=body)
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["key"]["rotatedFromKeyId"] == old["key"]["keyId"]

        revoked = await client.post(
            f"/api/v1/keys/{rotated.json()['key']['keyId']}:revoke", headers=headers, json={}
        )
        assert revoked.status_code == 200, revoked.text
        superseded = await client.post(rotate, headers=headers, json=body)
        assert superseded.status_code == 400, superseded.text
        assert detail(superseded.json(), "ErrorInfo")["reason"] == "REQUEST_SUPERSEDED"
