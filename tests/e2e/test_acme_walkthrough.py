"""The README's walk-through with certbot and lego, run verbatim against the real gateway (the
block after `<!-- acme-walkthrough -->`), as a reader pasting it into a shell would."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_acme_server import cert_service  # noqa: F401 (the ACME-serving fixture)
from tests.e2e.test_gateway import operator_key
from tests.fixtures.key import RunningKeyService

README = Path(__file__).resolve().parents[2] / "README.md"
CERTBOT = Path(sys.executable).parent / "certbot"


def walkthrough() -> str:
    match = re.search(r"<!-- acme-walkthrough -->\n```sh\n(.*?)\n```", README.read_text(), re.S)
    assert match is not None, "README.md lost its ACME walk-through block"
    return match.group(1)


@pytest.mark.skipif(
    not CERTBOT.exists() or shutil.which("lego") is None, reason="certbot or lego not installed"
)
async def test_readme_acme_walkthrough_runs_verbatim(
    gateway: Gateway, key_service: RunningKeyService, tmp_path: Path
) -> None:
    admin = await operator_key(key_service)
    env = {
        "PATH": f"{CERTBOT.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "GATEWAY": gateway.url,
        "ADMIN_KEY": admin,
    }
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        walkthrough(),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert text.count(": OK") == 2, text  # both openssl verify
    assert "'status': 'CERTIFICATE_STATUS_REVOKED'" in text, text
    assert "'certificateType': 'CERTIFICATE_TYPE_SINGLE'" in text, text
