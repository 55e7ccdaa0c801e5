"""Builds the Python stubs and the Envoy descriptor set from proto/.

Both come from the same sources so the transcoder and the services can never
disagree about the API.

Usage::

    python -m gateway.protos stubs        # regenerate sdk/python/tokenmesh/**/v1/*_pb2*.py(i)
    python -m gateway.protos descriptor   # write build/tokenmesh.pb for Envoy
    python -m gateway.protos check        # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import importlib.resources
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
THIRD_PARTY_DIR = ROOT / "third_party" / "googleapis"
STUBS_DIR = ROOT / "sdk" / "python"
DESCRIPTOR_PATH = ROOT / "build" / "tokenmesh.pb"
# The transcoder prints google.rpc details of errors as JSON only when their
# types are in the descriptor set.
EXTRA_DESCRIPTOR_FILES = ("google/rpc/error_details.proto", "google/rpc/status.proto")


def stub_modules(pattern: str) -> Iterator[ModuleType]:
    """Imports and yields the API's generated Python modules named like `pattern`
    (e.g. "*_service_pb2.py"), in path order."""
    for module_path in sorted(STUBS_DIR.glob(f"tokenmesh/**/{pattern}")):
        relative = module_path.relative_to(STUBS_DIR).with_suffix("")
        yield importlib.import_module(".".join(relative.parts))


def proto_files() -> list[str]:
    """Returns every tokenmesh .proto file, relative to proto/, sorted."""
    return sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))


def _include_args() -> list[str]:
    import google.rpc  # googleapis-common-protos ships the .proto sources

    wkt = importlib.resources.files("grpc_tools") / "_proto"
    googleapis_wheel = Path(next(iter(google.rpc.__path__))).parent.parent
    return [
        f"-I{PROTO_DIR}",
        f"-I{THIRD_PARTY_DIR}",
        f"-I{googleapis_wheel}",
        f"-I{wkt}",
    ]


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    code = protoc.main(["protoc", *_include_args(), *args])
    if code != 0:
        raise SystemExit(f"gateway.protos: protoc failed with exit code {code}")


def _plugin(name: str) -> str:
    """Returns --plugin for a protoc plugin installed beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"gateway.protos: {name} not found beside {sys.executable} (make setup)")
    return f"--plugin={name}={path}"


def generate_stubs(out_dir: Path) -> None:
    """Writes _pb2.py(i) and _pb2_grpc.py(i) for every tokenmesh proto.

    The .pyi stubs come from mypy-protobuf, which also types the gRPC
    servicers and stubs (protoc's own --pyi_out covers messages only).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            _plugin("protoc-gen-mypy"),
            _plugin("protoc-gen-mypy_grpc"),
            f"--python_out={out_dir}",
            f"--mypy_out=quiet:{out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_grpc_out=quiet:{out_dir}",
            *proto_files(),
        ]
    )
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        _mark_packages(package_dir, out_dir)


def _mark_packages(package_dir: Path, root: Path) -> None:
    """Adds the __init__.py files that make generated dirs regular packages."""
    while package_dir != root:
        init = package_dir / "__init__.py"
        if not init.exists() and package_dir.parent != root:
            init.write_text("")
        package_dir = package_dir.parent


def build_descriptor_set(out_path: Path = DESCRIPTOR_PATH) -> Path:
    """Writes the FileDescriptorSet Envoy's transcoder loads; returns its path."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out_path}",
            *proto_files(),
            *EXTRA_DESCRIPTOR_FILES,
        ]
    )
    return out_path


def stale_stubs() -> list[str]:
    """Returns the generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate_stubs(fresh)
        stale = []
        for path in sorted(fresh.rglob("*_pb2*.py*")):
            rel = path.relative_to(fresh)
            committed = STUBS_DIR / rel
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(rel))
        generated = {str(p.relative_to(fresh)) for p in fresh.rglob("*_pb2*.py*")}
        for path in sorted((STUBS_DIR / "tokenmesh").rglob("*_pb2*.py*")):
            if str(path.relative_to(STUBS_DIR)) not in generated:
                stale.append(str(path.relative_to(STUBS_DIR)))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.protos")
    parser.add_argument("command", choices=["stubs", "descriptor", "check"])
    args = parser.parse_args(argv)
    if args.command == "stubs":
        generate_stubs(STUBS_DIR)
    elif args.command == "descriptor":
        print(build_descriptor_set())
    else:
        stale = stale_stubs()
        if stale:
            print("gateway.protos: stale generated stubs (run `make proto`):", *stale, sep="\n  ")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
