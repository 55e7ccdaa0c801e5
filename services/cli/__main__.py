"""`tokenmesh`: operator CLI for a mesh, talking gRPC to its services.

Finds a local mesh through $TOKENMESH_STATE_DIR (default .tokenmesh): the auth
address from run/mesh.json and the dev admin key from dev-api-key. For a
remote mesh pass --auth-address / --api-key (or TOKENMESH_AUTH_ADDR,
TOKENMESH_API_KEY).

    tokenmesh keys create --tenant acme --scopes inference:generate,models:read --json
    tokenmesh keys list [--tenant T] [--json]
    tokenmesh keys revoke ID
    tokenmesh keys rotate ID --overlap 300 --json
    tokenmesh token [--api-key tm_...]
    tokenmesh signing-keys rotate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format

from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2_grpc
from tokenmesh.auth.v1 import auth_service_pb2 as pb

TIMEOUT_S = 10.0


def _state_dir() -> Path:
    return Path(os.environ.get("TOKENMESH_STATE_DIR", ".tokenmesh"))


def _auth_address(args: argparse.Namespace) -> str:
    if args.auth_address:
        return str(args.auth_address)
    manifest = _state_dir() / "run" / "mesh.json"
    if not manifest.exists():
        raise SystemExit(
            f"tokenmesh: no local mesh at {manifest} (start `make run`, or pass --auth-address)"
        )
    return f"127.0.0.1:{json.loads(manifest.read_text())['ports']['auth']}"


def _api_key(args: argparse.Namespace) -> str:
    if args.api_key:
        return str(args.api_key)
    path = _state_dir() / "dev-api-key"
    if not path.exists():
        raise SystemExit(
            f"tokenmesh: no API key (pass --api-key or TOKENMESH_API_KEY; {path} does not exist)"
        )
    return path.read_text().strip()


def _print(message: Any, as_json: bool, text: str) -> None:
    if as_json:
        print(
            json.dumps(
                json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2
            )
        )
    else:
        print(text)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def keys_create(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = pb.CreateApiKeyRequest(
        tenant=args.tenant,
        name=args.name or "",
        scopes=_csv(args.scopes),
        allowed_models=_csv(args.models),
        limits=auth_pb2.KeyLimits(
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            monthly_tokens=args.monthly_tokens,
            priority_tier=args.tier or "",
        ),
    )
    if args.ttl:
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=args.ttl))
    reply = stub.CreateApiKey(request, metadata=metadata, timeout=TIMEOUT_S)
    if args.json:
        body = json_format.MessageToDict(reply.api_key, preserving_proto_field_name=True)
        print(json.dumps({**body, "secret": reply.secret}, indent=2))
    else:
        print(f"id: {reply.api_key.id}\nsecret: {reply.secret}\n(shown once; store it now)")


def keys_list(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.ListApiKeys(
        pb.ListApiKeysRequest(tenant=args.tenant or ""), metadata=metadata, timeout=TIMEOUT_S
    )
    lines = [
        f"{k.id}  {k.tenant:<16} {auth_pb2.ApiKeyState.Name(k.state):<22} {' '.join(k.scopes)}"
        for k in reply.api_keys
    ]
    _print(reply, args.json, "\n".join(lines) or "(no keys)")


def keys_revoke(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=args.id), metadata=metadata, timeout=TIMEOUT_S
    )
    _print(reply.api_key, args.json, f"revoked {reply.api_key.id}")


def keys_rotate(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = pb.RotateApiKeyRequest(id=args.id)
    if args.overlap is not None:
        request.overlap.CopyFrom(duration_pb2.Duration(seconds=args.overlap))
    reply = stub.RotateApiKey(request, metadata=metadata, timeout=TIMEOUT_S)
    if args.json:
        body = json_format.MessageToDict(reply, preserving_proto_field_name=True)
        print(json.dumps(body, indent=2))
    else:
        print(
            f"id: {reply.api_key.id}\nsecret: {reply.secret}\nold secret valid until "
            f"{reply.old_secret_expire_time.ToJsonString()}"
        )


def token(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.IssueToken(pb.IssueTokenRequest(api_key=_api_key(args)), timeout=TIMEOUT_S)
    _print(reply, args.json, reply.access_token)


def signing_rotate(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    reply = stub.RotateSigningKey(
        pb.RotateSigningKeyRequest(), metadata=metadata, timeout=TIMEOUT_S
    )
    _print(reply.signing_key, args.json, f"current signing key: {reply.signing_key.kid}")


Command = Callable[[Any, argparse.Namespace, Sequence[tuple[str, str]]], None]


def parser() -> argparse.ArgumentParser:
    """Builds the argument parser."""
    root = argparse.ArgumentParser(prog="tokenmesh", description="Operate a tokenmesh mesh.")
    root.add_argument(
        "--auth-address", default=os.environ.get("TOKENMESH_AUTH_ADDR"), help="auth host:port"
    )
    root.add_argument(
        "--api-key", default=os.environ.get("TOKENMESH_API_KEY"), help="admin API key"
    )
    root.add_argument("--json", action="store_true", help="print JSON")
    groups = root.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key (prints its secret once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated")
    create.add_argument("--models", help="comma-separated allowed models (default: all)")
    create.add_argument("--name")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute")
    create.add_argument("--monthly-tokens", type=int, default=0)
    create.add_argument("--tier")
    create.add_argument("--ttl", type=int, help="lifetime in seconds")
    create.set_defaults(run=keys_create)
    listing = keys.add_parser("list", help="list keys (never secrets)")
    listing.add_argument("--tenant")
    listing.set_defaults(run=keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("id")
    revoke.set_defaults(run=keys_revoke)
    rotate = keys.add_parser(
        "rotate", help="issue a new secret; the old one works for --overlap seconds"
    )
    rotate.add_argument("id")
    rotate.add_argument("--overlap", type=int)
    rotate.set_defaults(run=keys_rotate)
    token_cmd = groups.add_parser("token", help="exchange an API key for a JWT")
    token_cmd.set_defaults(run=token)
    signing = groups.add_parser("signing-keys", help="JWT signing keys").add_subparsers(
        dest="action", required=True
    )
    signing_rotate_cmd = signing.add_parser("rotate", help="promote the next signing key")
    signing_rotate_cmd.set_defaults(run=signing_rotate)
    for sub in (create, listing, revoke, rotate, token_cmd, signing_rotate_cmd):
        sub.add_argument("--json", action="store_true", help="print JSON")
    return root


def main(argv: list[str] | None = None) -> int:
    """Runs one CLI command; returns the process exit code."""
    args = parser().parse_args(argv)
    command: Command = args.run
    try:
        with grpc.insecure_channel(_auth_address(args)) as channel:
            stub = auth_service_pb2_grpc.AuthServiceStub(channel)
            metadata = [] if command is token else [("x-api-key", _api_key(args))]
            command(stub, args, metadata)
    except grpc.RpcError as error:
        print(f"tokenmesh: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
