"""The checked-in generated code is exactly what the contracts produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "protos"))
import generate  # noqa: E402


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = generate.generated_files(tmp_path)
    checked_in = generate.generated_files(ROOT)
    assert fresh == checked_in, "generated file set differs: run `make proto`"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"stale generated files (run `make proto`): {stale}"


def test_generated_modules_import_and_describe_the_services() -> None:
    from myl.cert.v1 import cert_pb2, cert_pb2_grpc
    from myl.envoy.service.auth.v3 import external_auth_pb2
    from myl.key.v1 import key_pb2, key_pb2_grpc

    assert cert_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name == (
        "myl.cert.v1.CertificateService"
    )
    assert key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].methods_by_name["VerifyApiKey"]
    assert hasattr(cert_pb2_grpc, "CertificateServiceStub")
    assert hasattr(key_pb2_grpc, "ApiKeyServiceStub")
    check = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
    assert check.full_name == "envoy.service.auth.v3.Authorization"


@pytest.mark.parametrize(
    ("message", "body"),
    [
        ("myl.cert.v1.ProvisionCertificateRequest", {"deviceId", "uuidSubdomain"}),
        ("myl.key.v1.GenerateApiKeyRequest", {"deviceId", "deviceName"}),
    ],
)
def test_seed_json_bodies_match_the_contract(message: str, body: set[str]) -> None:
    from google.protobuf import descriptor_pool

    import myl.cert.v1.cert_pb2
    import myl.key.v1.key_pb2  # noqa: F401

    fields = descriptor_pool.Default().FindMessageTypeByName(message).fields
    assert body <= {f.json_name for f in fields}


def test_gateway_descriptor_set_carries_error_details() -> None:
    from google.protobuf import descriptor_pb2

    descriptors = descriptor_pb2.FileDescriptorSet()
    descriptors.ParseFromString((ROOT / generate.DESCRIPTOR_SET).read_bytes())
    names = {f.name for f in descriptors.file}
    assert {
        "myl/cert/v1/cert.proto",
        "myl/key/v1/key.proto",
        "google/rpc/error_details.proto",
        "google/api/annotations.proto",
    } <= names
