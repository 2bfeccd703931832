"""Fixtures of the fault suite: one real stack for all its tests.

`fault_stack` (package) starts PostgreSQL, Redis, cert_service, key_service and Envoy as
separate processes (see `tests/faults/stack.py`) the first time a fault test needs them, and
stops them when the worker goes on to tests outside this package (even idle, a stack takes CPU
the other tests need); `stack`
hands it to a test after resuming and restarting whatever an earlier test left stopped. Each
test makes its own devices and keys, so counts never mix between tests.

Set `MYL_FAULTS_KEEP=1` to keep the stack's directory (service, Envoy and database logs) after
the run; its path is printed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from tests.faults.stack import FaultStack, start_fault_stack, stop_fault_stack


@pytest.fixture(scope="package")
async def fault_stack() -> AsyncIterator[FaultStack]:
    stack = await start_fault_stack()
    keep = os.environ.get("MYL_FAULTS_KEEP", "") not in ("", "0")
    try:
        yield stack
    finally:
        await stop_fault_stack(stack, keep=keep)
        if keep:
            print(f"\nfault stack kept in {stack.directory}")


@pytest.fixture
async def stack(fault_stack: FaultStack) -> FaultStack:
    await fault_stack.heal()
    return fault_stack
