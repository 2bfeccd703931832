"""Schemathesis, a fuzzer nobody here wrote, against the real gateway from /openapi.json.

Run with an operator key and with a device key. It fails on any 5xx, any response outside
the document (status, content type, headers, body schema), and any request the document
calls invalid that the gateway accepts. Bounded for `make
test` (fixed seed, a few hundred cases per key); `make fuzz` runs it longer with a random
seed and the stateful phase.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

import httpx

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import device_key, operator_key, provision
from tests.fixtures.key import RunningKeyService

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Not `unsupported_method`: Envoy itself refuses QUERY without a content type before any
# route is matched, so that 405 cannot carry the per-path `Allow` header the check wants
# (other undeclared methods get 405 with `Allow` from the check; tests/e2e/test_edge.py).
# Not `positive_data_acceptance`: the document does not repeat every rule the services
# apply (device id syntax, UUIDs, ...), so a schema-valid request may well be a 400.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,negative_data_rejection"
)


def schemathesis_command(
    gateway: Gateway, key: str, *, examples: int, seed: int | None
) -> list[str]:
    return [
        str(SCHEMATHESIS), "run", f"{gateway.url}/openapi.json",
        "-H", f"X-API-Key: {key}",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--phases", os.environ.get("MYL_FUZZ_PHASES", "examples,coverage,fuzzing"),
        "--workers", "2",
        "--generation-database", "none",
        "--no-color",
        *(["--seed", str(seed)] if seed is not None else []),
    ]  # fmt: skip


async def run_schemathesis(gateway: Gateway, key: str, workdir: Path) -> str:
    examples = int(os.environ.get("MYL_FUZZ_EXAMPLES", "5"))
    seed = None if os.environ.get("MYL_FUZZ_RANDOM") else 20261130
    process = await asyncio.create_subprocess_exec(
        *schemathesis_command(gateway, key, examples=examples, seed=seed),
        stdout=PIPE,
        stderr=STDOUT,
        cwd=workdir,  # it keeps a cache in .schemathesis/ there
    )
    out, _ = await asyncio.wait_for(process.communicate(), 900)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text[-8000:]
    return text


async def test_schemathesis_finds_nothing_with_an_operator_or_a_device_key(
    gateway: Gateway, key_service: RunningKeyService, tmp_path: Path
) -> None:
    operator, _ = await key_service.issue_device_key(
        None,
        permissions=["admin", "api:access", "ssl:read", "ssl:write", "device:read", "device:write"],
        rate_limit=1_000_000,
    )
    async with httpx.AsyncClient() as client:
        admin = await operator_key(key_service)
        await provision(client, gateway, admin, "fuzz-device")
        device = await device_key(
            client, gateway, admin, "fuzz-device",
            permissions=["ssl:read", "ssl:write", "device:read", "device:write", "api:access"],
            rateLimit=1_000_000,
        )  # fmt: skip
    reports = await asyncio.gather(
        run_schemathesis(gateway, operator, tmp_path),
        run_schemathesis(gateway, device["apiKey"], tmp_path),
    )
    for report in reports:
        generated = re.search(r"(\d+) generated", report)
        assert generated is not None, report[-3000:]
        assert int(generated.group(1)) >= 100, report[-3000:]
