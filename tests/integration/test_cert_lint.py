"""Outside linters on what the service issues: pkilint (PyPI), its command-line tools (their
mains, with an auditor's arguments, all in one interpreter), on every kind of certificate
(wildcard, single, CSR with EC and RSA, renewed, the CA) and on a CRL with entries.

CA/Browser Forum profiles: `lint_cabf_serverauth_cert -t DV-FINAL-CERTIFICATE` for leaves,
`-t ROOT-CA` for the development CA, `lint_crl -p BR`. PKIX: `lint_pkix_cert`. No finding may be
an ERROR or FATAL, except the one PKIX finding that RFC 5280's name syntax makes of every
wildcard name (`pkix.invalid_domain_name_syntax` on `*.label.zone`; the CA/Browser Forum
profile, which governs wildcards, accepts it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures.cert import RunningCertService, make_csr

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
WILDCARD_NAME_SYNTAX = "pkix.invalid_domain_name_syntax"


# The console scripts are `sys.exit(main())` of these modules: the same mains, with the same
# arguments, in one interpreter (each start of one costs about a second of CPU).
RUN_TOOLS = """
import contextlib, importlib, io, json, sys
answers = []
for tool, args in json.load(sys.stdin):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = importlib.import_module("pkilint.bin." + tool).main(args)
    answers.append(out.getvalue())
json.dump(answers, sys.stdout)
"""


async def lint_all(
    checks: list[tuple[str, Path, tuple[str, ...]]],
) -> list[list[tuple[str, str, str]]]:
    """For each (tool, path, options): (severity, code, message) of every finding of
    WARNING or above."""
    calls = [
        (tool, ["lint", *options, "-s", "WARNING", "-f", "JSON", str(path)])
        for tool, path, options in checks
    ]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_TOOLS,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(json.dumps(calls).encode())
    assert process.returncode == 0, err.decode()
    answers: list[str] = json.loads(out)
    findings = []
    for (tool, _), answer in zip(calls, answers, strict=True):
        assert answer, (tool, err.decode())
        report: Any = json.loads(answer)
        findings.append(
            [
                (finding["severity"], finding["code"], finding.get("message") or "")
                for result in report["results"]
                for finding in result["finding_descriptions"]
            ]
        )
    return findings


def errors(findings: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [f for f in findings if f[0] in ("ERROR", "FATAL")]


async def test_pkilint_finds_no_error_in_any_kind_of_certificate_or_crl(
    cert_stub: Stub, cert_service: RunningCertService, tmp_path: Path
) -> None:
    requests = {
        "wildcard": cert_pb2.ProvisionCertificateRequest(device_id="wildcard"),
        "single": cert_pb2.ProvisionCertificateRequest(
            device_id="single", certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE
        ),
        "csr-ec": cert_pb2.ProvisionCertificateRequest(
            device_id="csr-ec",
            uuid_subdomain="csr-ec",
            csr_pem=make_csr(["csr-ec.myl.zip"], ec.generate_private_key(ec.SECP384R1())),
        ),
        "csr-rsa": cert_pb2.ProvisionCertificateRequest(
            device_id="csr-rsa",
            uuid_subdomain="csr-rsa",
            certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE,
            csr_pem=make_csr(
                ["csr-rsa.myl.zip"], rsa.generate_private_key(public_exponent=65537, key_size=2048)
            ),
        ),
    }
    pems: dict[str, str] = {}
    for kind, request in requests.items():
        reply = await cert_stub.ProvisionCertificate(request)
        pems[kind] = reply.certificate.certificate_chain_pem
    renewed = await cert_stub.RenewCertificate(cert_pb2.RenewCertificateRequest(device_id="single"))
    pems["renewed"] = renewed.certificate.certificate_chain_pem
    await cert_stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(
            device_id="wildcard", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
        )
    )
    publisher = cert_service.app.crl_publisher
    assert publisher is not None
    await publisher.run_once()

    checks: list[tuple[str, str, Path, tuple[str, ...]]] = []
    for kind, chain in pems.items():
        path = tmp_path / f"{kind}.pem"
        path.write_text(chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
        checks.append((kind, "lint_cabf_serverauth_cert", path, ("-t", "DV-FINAL-CERTIFICATE")))
        checks.append((kind, "lint_pkix_cert", path, ()))
    ca_path = tmp_path / "ca.pem"
    ca_path.write_text(cert_service.app.certificates.ca_chain_pem())
    checks.append(("ca", "lint_cabf_serverauth_cert", ca_path, ("-t", "ROOT-CA")))
    checks.append(("ca", "lint_pkix_cert", ca_path, ()))
    crls = [await publisher.current(shard) for shard in range(cert_service.config.pki.crl_shards)]
    crl = next(crl for crl in crls if crl is not None and crl.entries)
    crl_path = tmp_path / "shard.crl"
    crl_path.write_bytes(crl.der)
    checks.append(("crl", "lint_crl", crl_path, ("-t", "CRL", "-p", "BR")))
    checks.append(("crl", "lint_crl", crl_path, ("-t", "CRL", "-p", "PKIX")))

    reports = await lint_all([(tool, path, opts) for _, tool, path, opts in checks])
    for (kind, tool, _, options), findings in zip(checks, reports, strict=True):
        found = errors(findings)
        if tool == "lint_pkix_cert" and kind in ("wildcard", "csr-ec"):  # both WILDCARD
            assert [code for _, code, _ in found] == [WILDCARD_NAME_SYNTAX], found
            continue
        assert found == [], (kind, tool, options, found)
        if tool == "lint_cabf_serverauth_cert":
            codes = {code for _, code, _ in findings}
            # What the issue reported before CRLs, AIA and policies existed.
            assert not codes & {
                "cabf.serverauth.subscriber.revocation_information_absent",
                "cabf.serverauth.subscriber.authority_info_access_extension_absent",
                "cabf.serverauth.subscriber.certificate_policies_extension_absent",
                "cabf.country_attribute_absent",
                "cabf.organization_name_attribute_absent",
            }
