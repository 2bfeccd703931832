"""Issue 8, point 4: a device deleted while key_service is down loses its keys within 2 s of
key_service serving again."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from myl.cert.v1 import cert_pb2
from tests.faults.load import VALID
from tests.faults.stack import FaultStack

pytestmark = pytest.mark.slow

DOWN_FOR = 4.0  # seconds key_service stays down after the delete: its retries back off
REVOKED_WITHIN = 2.0  # seconds after key_service serves again


async def test_keys_of_a_device_deleted_while_key_service_was_down_stop_verifying(
    stack: FaultStack,
) -> None:
    device_id, api_key, _ = await stack.device_with_key("deleted")
    assert await stack.verify(api_key) == VALID  # cached in Redis as VALID

    await stack.stop_service("key_service", signal.SIGKILL)
    await stack.cert.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id=device_id), timeout=5)
    await asyncio.sleep(DOWN_FOR)
    serving = await stack.start_service("key_service")

    results: list[str] = []
    while True:
        result = await stack.verify(api_key, dry_run=True)
        results.append(result)
        waited = time.monotonic() - serving
        if result != VALID or waited > 10 * REVOKED_WITHIN:
            break
        await asyncio.sleep(0.05)
    print(
        f"\n[delete cascade] key answered {result} {waited:.2f}s after key_service served "
        f"again ({results.count(VALID)} VALID answers before)"
    )
    assert result != VALID, f"the deleted device's key still verified {waited:.1f}s later"
    assert waited <= REVOKED_WITHIN, f"the deletion reached key_service {waited:.2f}s later"
