"""Generate the Python code and the Envoy descriptor set from the contracts.

    python protos/generate.py            # write into the repository
    python protos/generate.py --out DIR  # write into DIR instead (used by the
                                         # freshness test, which diffs the two)

Generated files are checked in. The descriptor set (`deploy/envoy/myl.pb`)
holds both services and the `google.rpc` error detail types so that Envoy's
gRPC-JSON transcoder can render ErrorInfo and BadRequest as JSON. The OpenAPI
document of the REST surface (`deploy/envoy/openapi.json`, served by the
gateway at `GET /openapi.json`) is written from that descriptor set
(`openapi.py`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DESCRIPTOR_SET = Path("deploy/envoy/myl.pb")
OPENAPI = Path("deploy/envoy/openapi.json")
# Protos whose Python code we generate (google/* comes from googleapis-common-protos).
PYTHON_SOURCES = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "myl").rglob("*.proto"))
# Protos the gateway transcodes, plus the error detail types it must render.
GATEWAY_SOURCES = [
    "myl/cert/v1/cert.proto",
    "myl/key/v1/key.proto",
    "google/rpc/error_details.proto",
]


def _protoc(args: list[str]) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    argv = ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(out: Path) -> None:
    py_out = out / "protos"
    py_out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    _protoc(
        [
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={py_out}",
            f"--mypy_out={py_out}",
            f"--grpc_python_out={py_out}",
            f"--mypy_grpc_out={py_out}",
            *PYTHON_SOURCES,
        ]
    )
    # Regular packages, so that `myl` imports the same way everywhere.
    for directory in {(py_out / src).parent for src in PYTHON_SOURCES}:
        while directory != py_out:
            (directory / "__init__.py").touch()
            directory = directory.parent
    (out / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            f"--descriptor_set_out={out / DESCRIPTOR_SET}",
            "--include_imports",
            "--include_source_info",
            *GATEWAY_SOURCES,
        ]
    )
    import openapi  # beside this file; it imports the generated myl.auth.v1 options

    (out / OPENAPI).write_text(openapi.render((out / DESCRIPTOR_SET).read_bytes()))


def generated_files(base: Path) -> list[Path]:
    """Every generated file under `base`, relative to it."""
    py = base / "protos" / "myl"
    found = [
        p.relative_to(base)
        for p in py.rglob("*")
        if p.is_file() and (p.suffix in {".py", ".pyi"}) and p.name != "generate.py"
    ]
    return sorted([*found, DESCRIPTOR_SET, OPENAPI])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write here instead of the repository")
    args = parser.parse_args()
    if args.out is not None:
        generate(args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for old in generated_files(ROOT):
            if old not in (DESCRIPTOR_SET, OPENAPI):
                (ROOT / old).unlink()
        for rel in generated_files(Path(tmp)):
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
