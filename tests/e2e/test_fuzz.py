"""Schemathesis, a fuzzer nobody here wrote, against the real gateway from /openapi.json.

Run with an operator key and with a device key. It fails on any 5xx, any response outside
the document (status, content type, headers, body schema), and any request the document
calls invalid that the gateway accepts. Bounded for `make
test` (fixed seed, a few hundred cases per key); `make fuzz` runs it longer with a random
seed and the stateful phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
from asyncio.subprocess import PIPE, STDOUT
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import device_key, operator_key, provision
from tests.fixtures.key import RunningKeyService
from tests.fixtures.wait import access_log_through

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


# Operations that can revoke the key a run authenticates with: the device key's run leaves
# them to the operator key's run (an operator key is revoked only by its id, which no
# operation hands out), so no run locks itself out halfway.
SELF_REVOKING = ("RevokeApiKey", "RotateApiKey", "RevokeDeviceApiKeys", "DeleteDevice")


_INTERPRETER_CRASH = "SystemError: AST constructor recursion depth mismatch"


def fuzz_seed() -> int:
    """MYL_FUZZ_SEED, else a fixed seed for `make test`, or a random one (MYL_FUZZ_RANDOM)."""
    if os.environ.get("MYL_FUZZ_SEED"):
        return int(os.environ["MYL_FUZZ_SEED"])
    if os.environ.get("MYL_FUZZ_RANDOM"):
        return random.SystemRandom().randrange(1, 2**31)
    return 20261130


def schemathesis_command(
    gateway: Gateway, key: str, *, examples: int, seed: int, exclude: tuple[str, ...] = ()
) -> list[str]:
    excluded = [arg for name in exclude for arg in ("--exclude-operation-id", name)]
    return [
        str(SCHEMATHESIS), "run", f"{gateway.url}/openapi.json",
        "-H", f"X-API-Key: {key}",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--phases", os.environ.get("MYL_FUZZ_PHASES", "examples,coverage,fuzzing"),
        "--workers", "2",
        "--generation-database", "none",
        "--no-color",
        "--seed", str(seed),
        *excluded,
    ]  # fmt: skip


async def run_schemathesis(
    gateway: Gateway, key: str, workdir: Path, seed: int, exclude: tuple[str, ...] = ()
) -> str:
    examples = int(os.environ.get("MYL_FUZZ_EXAMPLES", "5"))
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            *schemathesis_command(gateway, key, examples=examples, seed=seed, exclude=exclude),
            stdout=PIPE,
            stderr=STDOUT,
            cwd=workdir,  # it keeps a cache in .schemathesis/ there
        )
        out, _ = await asyncio.wait_for(process.communicate(), 900)
        text = out.decode(errors="replace")
        # CPython 3.11 can fail to compile a module imported lazily by two of the fuzzer's
        # threads at once (its own crash, not an answer of ours): run it again, once.
        if process.returncode == 0 or _INTERPRETER_CRASH not in text:
            break
    assert process.returncode == 0, f"seed {seed}\n" + text[-8000:]
    return text


def where_requests_ended(access_log: Path) -> Counter[str]:
    """The gateway's answers by where they came from: a service, the key check's lockout of
    the client address, another refusal by the check, or the gateway itself."""
    ended: Counter[str] = Counter()
    for line in access_log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("upstream_host"):
                ended["service"] += 1
            elif entry.get("details") == "ext_authz_denied" and entry.get("status") == 429:
                ended["rate limited by the check"] += 1
            elif entry.get("details") == "ext_authz_denied":
                ended["refused by the check"] += 1
            else:
                ended["answered by the gateway"] += 1
    return ended


@pytest.fixture
def key_check_timeout() -> float:
    """The fuzzer looks for wrong answers, not for capacity: on a machine busy with the rest
    of the suite (and the fuzzer's own four connections) a check can wait for a core past
    the product's 0.5 s, and that 503 would be counted as a server error. Any longer check
    still ends in an answer the fuzzer judges."""
    return 5.0


@pytest.fixture
def key_service_env(tmp_path: Path) -> dict[str, str]:
    """The fuzzer's bad keys come from one address: lift the per-address lockout for
    loopback, or nearly every case would end at the lockout instead of a service."""
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "overrides:\n"
        "  - FailedVerificationsPerAddress:\n"
        "      {burst: 1000000, count: 1000000, period: 1s, ids: ['127.0.0.1']}\n"
    )
    return {"LIMITS_FILE": str(limits)}


# The fuzzer's run in `make test`; `make fuzz` (MYL_FUZZ_RANDOM) runs as long as it takes.
@pytest.mark.timeout(0 if os.environ.get("MYL_FUZZ_RANDOM") else 180)
async def test_schemathesis_finds_nothing_with_an_operator_or_a_device_key(
    gateway: Gateway, key_service: RunningKeyService, tmp_path: Path
) -> None:
    seed = fuzz_seed()
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
        run_schemathesis(gateway, operator, tmp_path, seed),
        run_schemathesis(gateway, device["apiKey"], tmp_path, seed, exclude=SELF_REVOKING),
    )
    cases = 0
    for report in reports:
        generated = re.search(r"(\d+) generated", report)
        assert generated is not None, report[-3000:]
        assert int(generated.group(1)) >= 100, report[-3000:]
        cases += int(generated.group(1))
    await access_log_through(gateway.url, gateway.access_log)
    ended = where_requests_ended(gateway.access_log)
    print(f"\nschemathesis seed {seed}: {cases} cases; requests ended: {dict(ended)}")
    # The run reached the services: the lockout did not answer it instead.
    assert ended["service"] > ended["rate limited by the check"], dict(ended)
