"""CA key benchmark: issuance and CRL signing per second with the CA key in a file and in a
SoftHSM2 token (`CA_KEY_URI`), side by side.

    python -m tests.bench.bench_ca_key [--seconds S]     (or `make bench`)

One process, one thread, as cert_service signs (in its event loop): `LocalCertificateAuthority`
issuing a wildcard device certificate (`issue`, everything the service does to sign one),
signing a CRL shard of 100 entries (`cert_service.crl.sign_crl`), and the bare signature of a
32-byte digest by the key (what the token itself costs). Each for EC P-256 (the development
CA's) and RSA 2048, with the key in this process's memory (`CA_KEY_FILE`) and in a SoftHSM2
token made in a temporary directory (`deploy.devstack.softhsm`; SoftHSM2 runs in this process,
so its time is this process's CPU, printed per issuance beside the rate: the steadier number on
a shared machine). A real HSM adds a round trip per signature and signs at its own rate. It
prints numbers; it does not pass or fail on a time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

NAMES = ["bench.myl.zip", "*.bench.myl.zip"]


def median(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """The median of each column."""
    rates, cpus = zip(*samples, strict=True)
    return statistics.median(rates), statistics.median(cpus)


def rate(work: Callable[[], Any], seconds: float) -> tuple[float, float]:
    """(calls of `work` per second, CPU microseconds per call) over about `seconds`."""
    count, started, cpu = 0, time.perf_counter(), time.process_time()
    deadline = started + seconds
    while True:
        for _ in range(10):
            work()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started), (time.process_time() - cpu) / count * 1e6


def run(seconds: float) -> None:
    import pkcs11
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.rsa import encode_rsa_public_key

    from cert_service.ca import (
        CaSigner,
        CaSubject,
        KeySigner,
        LocalCertificateAuthority,
        PkiLocations,
        ca_certificate,
    )
    from cert_service.crl import sign_crl
    from cert_service.hsm import Pkcs11Signer, Pkcs11Uri
    from cert_service.issuer import generate_private_key
    from cert_service.randomness import serial_number
    from cert_service.storage import RevokedEntry
    from deploy.devstack.softhsm import KEY_LABEL, TOKEN_LABEL, create_token_ca

    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="myl-bench-ca-key-"))
    signers: list[CaSigner] = []
    try:
        token_ca = create_token_ca(directory / "ca")
        pin = token_ca.pin_path.read_text()
        token = pkcs11.lib(token_ca.module).get_token(token_label=TOKEN_LABEL)
        with token.open(rw=True, user_pin=pin) as session:
            public, _ = session.generate_keypair(
                KeyType.RSA,
                2048,
                label="rsa",
                store=True,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
            token_rsa = serialization.load_der_public_key(encode_rsa_public_key(public))
        assert isinstance(token_rsa, rsa.RSAPublicKey)
        token_ec = x509.load_pem_x509_certificate(token_ca.cert_path.read_bytes()).public_key()
        assert isinstance(token_ec, ec.EllipticCurvePublicKey)
        base = f"pkcs11:token={TOKEN_LABEL};object={{label}}?module-path={token_ca.module}"
        file_ec = ec.generate_private_key(ec.SECP256R1())
        file_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token_ec_signer = Pkcs11Signer.open(
            Pkcs11Uri.parse(base.format(label=KEY_LABEL)), pin, token_ec
        )
        signers.append(token_ec_signer)
        token_rsa_signer = Pkcs11Signer.open(
            Pkcs11Uri.parse(base.format(label="rsa")), pin, token_rsa
        )
        signers.append(token_rsa_signer)
        cases: list[tuple[str, CaSigner, Callable[[bytes], Any]]] = [
            (
                "file, EC P-256",
                KeySigner(file_ec),
                lambda data: file_ec.sign(data, ec.ECDSA(hashes.SHA256())),
            ),
            (
                "SoftHSM2, EC P-256",
                token_ec_signer,
                lambda data: token_ec_signer.signature(data, hashes.SHA256()),
            ),
            (
                "file, RSA 2048",
                KeySigner(file_rsa),
                lambda data: file_rsa.sign(data, padding.PKCS1v15(), hashes.SHA256()),
            ),
            (
                "SoftHSM2, RSA 2048",
                token_rsa_signer,
                lambda data: token_rsa_signer.signature(data, hashes.SHA256()),
            ),
        ]
        device_key, _ = generate_private_key()
        now = datetime.now(UTC).replace(microsecond=0)
        entries = [RevokedEntry(format(serial_number(), "x"), now, "superseded")] * 100
        digest = hashlib.sha256(b"bench").digest()
        works: list[tuple[str, dict[str, Callable[[], Any]]]] = []
        for label, signer, bare in cases:
            certificate = ca_certificate(signer, CaSubject(common_name=f"bench {label}"))
            ca = LocalCertificateAuthority(
                certificate, signer, PkiLocations("http://pki.myl.zip", 128)
            )

            def issue(ca: LocalCertificateAuthority = ca) -> None:
                ca.issue(device_key, NAMES, now, now + timedelta(days=90))

            def crl(ca: LocalCertificateAuthority = ca) -> None:
                sign_crl(ca, 0, 1, now, now + timedelta(days=1), entries)

            works.append((label, {"issue": issue, "crl": crl, "sign": partial(bare, digest)}))
        # Interleaved short rounds, the cases in turn, so that a neighbour's load on a shared
        # machine falls on every case alike; the median round of each is printed.
        rounds = 7
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for label, kinds in works:
                for kind, work in kinds.items():
                    work()  # warm
                    share = seconds / rounds / (1 if kind == "issue" else 2)
                    results.setdefault((label, kind), []).append(rate(work, share))
        print(
            f"{'CA key':<22}{'issue/s':>9}{'CPU us/issue':>14}{'CRL(100)/s':>12}{'sign/s':>9}",
            flush=True,
        )
        for label, _ in works:
            issue_rate, issue_cpu = median(results[(label, "issue")])
            crl_rate, _ = median(results[(label, "crl")])
            sign_rate, _ = median(results[(label, "sign")])
            print(
                f"{label:<22}{issue_rate:>9.0f}{issue_cpu:>14.0f}{crl_rate:>12.0f}"
                f"{sign_rate:>9.0f}",
                flush=True,
            )
    finally:
        for signer in signers:
            signer.close()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="issuing, per CA key")
    run(parser.parse_args().seconds)


if __name__ == "__main__":
    main()
