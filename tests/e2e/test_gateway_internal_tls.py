"""The gateway reaches the services over mutual TLS, and takes a renewed identity live."""

from __future__ import annotations

import asyncio

import httpx

from tests.e2e.conftest import Gateway
from tests.fixtures import internal_tls


async def _serials(client: httpx.AsyncClient, gateway: Gateway) -> set[int]:
    """The serials of the certificates Envoy holds (its admin interface's /certs)."""
    reply = await client.get(f"http://127.0.0.1:{gateway.admin_port}/certs")
    return {
        int(cert["serial_number"], 16)
        for context in reply.json()["certificates"]
        for cert in context.get("cert_chain", [])
    }


async def test_a_renewed_gateway_identity_is_taken_without_a_restart(gateway: Gateway) -> None:
    identity = internal_tls.identity("gateway")
    async with httpx.AsyncClient(timeout=5) as client:
        assert identity.serial() in await _serials(client, gateway)
        # The services answer through the gateway: Envoy's mutual TLS to them works.
        reply = await client.get(f"{gateway.url}/pki/ca.cer")
        assert reply.status_code == 200, reply.text

        internal_tls.internal_ca().issue("gateway")
        renewed = identity.serial()
        deadline = asyncio.get_running_loop().time() + 10
        while renewed not in await _serials(client, gateway):
            assert asyncio.get_running_loop().time() < deadline, "Envoy kept the old identity"
            await asyncio.sleep(0.05)
        assert gateway.process.poll() is None  # the same Envoy
        reply = await client.get(f"{gateway.url}/healthz")
        assert reply.status_code == 200
