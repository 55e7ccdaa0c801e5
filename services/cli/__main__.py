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
    tokenmesh models list [--json]
    tokenmesh models split MODEL VERSION=WEIGHT [VERSION=WEIGHT ...]
    tokenmesh models pin MODEL [VERSION]          (no VERSION unpins)
    tokenmesh models deprecate MODEL VERSION --sunset YYYY-MM-DD
    tokenmesh models fallback MODEL FALLBACK_MODEL  ("" clears it)
    tokenmesh models pools MODEL [POOL ...]       (only workers of these pools serve it;
        no POOL: any worker)
    tokenmesh models alias MODEL ALIAS [VERSION]
    tokenmesh models register MODEL VERSION
    tokenmesh models price MODEL VERSION --prompt X --completion Y [--cached Z]  (USD per
        million tokens; --clear removes the price)
    tokenmesh models rollout [start] MODEL VERSION [--steps 5,25,50,100] [--step-seconds 60]
        [--max-error-rate 0.01] [--max-ttft-p99-ratio 1.5] [--min-requests 50]
    tokenmesh models rollout status|pause|resume|abort MODEL
    tokenmesh models shadow MODEL VERSION --percent P   (MODEL --off stops it)
    tokenmesh models compare MODEL BASELINE CANDIDATE [--since 1h]
    tokenmesh prompts create NAME --template-file FILE [--system TEXT]
                             [--variable NAME:MAXLEN[:required]]...
    tokenmesh prompts list [--json]
    tokenmesh prompts get NAME[@VERSION|@ALIAS] [--json]
    tokenmesh prompts alias NAME ALIAS [VERSION]   (no VERSION removes the alias)
    tokenmesh workers list [--json]
    tokenmesh workers drain WORKER_ID
    tokenmesh usage dead-letters [--limit N] [--json]
    tokenmesh policies create|list|get|attach|detach ...   (services/cli/policies.py)
    tokenmesh samples enable|disable|export ...
    tokenmesh jobs submit|list|get|cancel|results|redeliver ...   (services/cli/jobs.py)
    tokenmesh webhooks secret create|rotate [--json]

`models` and `prompts` commands go through the edge (--edge-address, TOKENMESH_EDGE_ADDR),
which checks the key's admin scope; over TLS with --edge-tls (TOKENMESH_EDGE_TLS=1), and
by default to an --edge-address that is not this host (--edge-plaintext insists), verifying
the edge with --edge-ca (TOKENMESH_EDGE_CA; implies TLS; default: the system's roots, or the
local mesh's CA for its own TLS listener); `workers` talk to the router
(--router-address, TOKENMESH_ROUTER_ADDR), which the edge does not expose.
`usage dead-letters` reads Redis itself ($REDIS_URL, else the local mesh's,
and $TOKENMESH_USAGE_STREAM): the usage entries the meter could not decode.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.cli import jobs as jobs_cli
from services.cli import policies as policy_cli
from services.cli import rollouts
from services.cli import shadow as shadow_cli
from services.cli.exits import (
    BAD_INPUT,
    FAILED,
    INTERRUPTED,
    BadInput,
    CommandError,
    Failed,
    credential,
    positive_int,
)
from services.cli.output import as_dict
from services.core import contract, identity, pki
from tokenmesh.auth.v1 import auth_pb2, auth_service_pb2_grpc
from tokenmesh.auth.v1 import auth_service_pb2 as pb
from tokenmesh.client import is_loopback_target
from tokenmesh.jobs.v1 import jobs_service_pb2_grpc
from tokenmesh.router.v1 import router_pb2, router_service_pb2_grpc
from tokenmesh.router.v1 import router_service_pb2 as router_pb
from tokenmesh.type.v1 import types_pb2

TIMEOUT_S = 10.0
INT32_MAX = 2**31 - 1
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _state_dir() -> Path:
    return Path(os.environ.get("TOKENMESH_STATE_DIR", ".tokenmesh"))


def _manifest_path() -> Path:
    return _state_dir() / "run" / "mesh.json"


def _manifest() -> dict[str, Any] | None:
    """Returns the local mesh's run/mesh.json (None: there is none).

    Raises:
        BadInput: it is not a JSON object (the message names the file: a bare
            "Expecting property name" left the operator to guess which).
    """
    path = _manifest_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise BadInput(f"cannot read the local mesh's {path}: {error.strerror}") from None
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise BadInput(f"the local mesh's {path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise BadInput(f"the local mesh's {path} is not a JSON object")
    return manifest


def _manifest_text(key: str) -> str | None:
    """Returns the local mesh's `key` from run/mesh.json (None: no mesh, or no such key).

    Raises:
        BadInput: the value is not a string (a hand-edited or corrupt file).
    """
    value = (_manifest() or {}).get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadInput(f"the local mesh's {_manifest_path()} has a bad {key!r}: {value!r}")
    return value


def _address(args: argparse.Namespace) -> str:
    """Returns host:port of the service the command talks to (auth, edge or router)."""
    via = "edge" if args.target in EDGE_TARGETS else args.target
    given = getattr(args, f"{via}_address")
    if given:
        return str(given)
    mesh = _manifest()
    if mesh is None:
        raise Failed(
            f"no local mesh at {_manifest_path()} (start `make run`, set "
            f"TOKENMESH_STATE_DIR to its state directory, or pass --{via}-address)"
        )
    try:
        if args.target not in EDGE_TARGETS:
            return f"127.0.0.1:{int(mesh['ports'][args.target])}"
        if not _edge_tls(args):
            return str(mesh["edge_url"]).removeprefix("http://")
    except (KeyError, TypeError, ValueError):
        raise BadInput(
            f"the local mesh's {_manifest_path()} has no {via} address: pass --{via}-address"
        ) from None
    if not mesh.get("edge_tls_url"):
        raise Failed("the local mesh's edge has no TLS listener")
    return str(mesh["edge_tls_url"]).removeprefix("https://")


def _edge_tls(args: argparse.Namespace) -> bool:
    """Tells whether the edge is spoken to over TLS: --edge-tls, implied by --edge-ca and
    by an --edge-address that is not this host (the admin key must not cross a network in
    the clear; the edge's plaintext listener is bound to 127.0.0.1), unless
    --edge-plaintext insists."""
    if args.edge_tls or args.edge_ca:
        return True
    if args.edge_plaintext or not args.edge_address:
        return False
    return not is_loopback_target(str(args.edge_address))


def _edge_roots(args: argparse.Namespace) -> bytes | None:
    """Returns the PEM roots the edge's certificate is verified with: --edge-ca; for the
    local mesh's own listener (no --edge-address) its CA; else None (the system's roots)."""
    if args.edge_ca:
        path = Path(args.edge_ca)
    elif args.edge_address is None:
        found = _manifest_text("ca")
        if not found:
            return None
        path = Path(found)
    else:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInput(f"cannot read the edge's CA {path}: {error}") from error


def _api_key(args: argparse.Namespace) -> str:
    if args.api_key:
        return credential(str(args.api_key), "--api-key or TOKENMESH_API_KEY")
    path = _state_dir() / "dev-api-key"
    if not path.exists():
        raise BadInput(f"no API key (pass --api-key or TOKENMESH_API_KEY; {path} does not exist)")
    return credential(path.read_text(), str(path))


def _print(message: Any, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(as_dict(message), indent=2))
    else:
        print(text)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _pins(pairs: Sequence[str]) -> dict[str, str]:
    pins = {}
    for pair in pairs:
        model, sep, version = pair.partition("=")
        if not (sep and model and version):
            raise BadInput(f"--pin {pair!r} is not MODEL=VERSION")
        pins[model] = version
    return pins


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
        pinned_versions=_pins(args.pin or []),
    )
    if args.ttl is not None:
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=args.ttl))
    reply = stub.CreateApiKey(request, metadata=metadata, timeout=TIMEOUT_S)
    if args.json:
        print(json.dumps({**as_dict(reply.api_key), "secret": reply.secret}, indent=2))
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
        print(json.dumps(as_dict(reply), indent=2))
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


def _model_line(model: router_pb2.CatalogModel) -> str:
    versions = ", ".join(
        f"{v.version}={v.weight}%"
        + ("" if v.state == router_pb2.CATALOG_VERSION_STATE_ACTIVE else " (deprecated)")
        + f" [{v.healthy_workers} workers]"
        + _price_text(v)
        for v in model.versions
    )
    extras = [f"pinned={model.pinned_version}"] if model.pinned_version else []
    extras += [f"fallback={model.fallback_model}"] if model.fallback_model else []
    extras += [f"pools={','.join(model.worker_pools)}"] if model.worker_pools else []
    extras += [f"{alias}->{version}" for alias, version in sorted(model.aliases.items())]
    if model.HasField("shadow"):
        extras.append(f"shadow={model.shadow.version}@{model.shadow.percent}%")
    return f"{model.name:<24} {versions}  {' '.join(extras)}".rstrip()


def _price_text(version: router_pb2.CatalogVersion) -> str:
    if not version.HasField("price"):
        return ""
    price = version.price
    cached = price.cached_prompt_per_million_tokens or price.prompt_per_million_tokens
    return (
        f" {price.currency_code}/1M tokens: prompt {price.prompt_per_million_tokens},"
        f" cached {cached}, completion {price.completion_per_million_tokens}"
    )


def models_list(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.ListCatalogModels(
        router_pb.ListCatalogModelsRequest(), metadata=metadata, timeout=TIMEOUT_S
    )
    _print(reply, args.json, "\n".join(map(_model_line, reply.models)) or "(no models)")


def _weights(pairs: Sequence[str]) -> list[router_pb2.TrafficWeight]:
    weights = []
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not (sep and version and weight.isdigit()):
            raise BadInput(f"{pair!r} is not VERSION=WEIGHT (e.g. 2=20)")
        if int(weight) > 100:
            raise BadInput(f"{pair!r}: WEIGHT is a share, 0-100")
        weights.append(router_pb2.TrafficWeight(version=version, weight=int(weight)))
    return weights


def _change(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]], rpc: str, request: Any
) -> None:
    """Calls one catalogue RPC and prints the model it returns."""
    reply = getattr(stub, rpc)(request, metadata=metadata, timeout=TIMEOUT_S)
    _print(reply.model, args.json, _model_line(reply.model))


def models_split(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = router_pb.SetTrafficSplitRequest(model=args.model, weights=_weights(args.weights))
    _change(stub, args, metadata, "SetTrafficSplit", request)


def models_pin(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = router_pb.PinModelVersionRequest(model=args.model, version=args.version or "")
    _change(stub, args, metadata, "PinModelVersion", request)


def _sunset(value: str) -> timestamp_pb2.Timestamp:
    try:
        day = datetime.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    except ValueError:
        raise BadInput(f"--sunset {value!r} is not YYYY-MM-DD") from None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(day)
    return stamp


def models_deprecate(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    request = router_pb.DeprecateModelVersionRequest(
        model=args.model, version=args.version, sunset_time=_sunset(args.sunset)
    )
    _change(stub, args, metadata, "DeprecateModelVersion", request)


def models_fallback(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    request = router_pb.SetFallbackModelRequest(model=args.model, fallback_model=args.fallback)
    _change(stub, args, metadata, "SetFallbackModel", request)


def models_pools(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = router_pb.SetModelWorkerPoolsRequest(model=args.model, worker_pools=args.pools)
    _change(stub, args, metadata, "SetModelWorkerPools", request)


def models_alias(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = router_pb.SetModelAliasRequest(
        model=args.model, alias=args.alias, version=args.version or ""
    )
    _change(stub, args, metadata, "SetModelAlias", request)


def models_register(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    request = router_pb.RegisterModelVersionRequest(model=args.model, version=args.version)
    _change(stub, args, metadata, "RegisterModelVersion", request)


def models_price(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    request = router_pb.SetModelPriceRequest(model=args.model, version=args.version)
    if not args.clear:
        if args.prompt is None or args.completion is None:
            raise BadInput("models price needs --prompt and --completion (or --clear)")
        request.price.CopyFrom(
            types_pb2.Price(
                currency_code="USD",
                prompt_per_million_tokens=args.prompt,
                cached_prompt_per_million_tokens=args.cached or "",
                completion_per_million_tokens=args.completion,
            )
        )
    _change(stub, args, metadata, "SetModelPrice", request)


def _prompt_line(template: router_pb2.CatalogPromptTemplate) -> str:
    aliases = " ".join(f"{a}->{v}" for a, v in sorted(template.aliases.items()))
    return f"{template.name:<24} latest={template.latest_version}  {aliases}".rstrip()


def _variables(specs: Sequence[str]) -> list[router_pb2.PromptVariable]:
    """Parses --variable NAME:MAXLEN[:required] (MAXLEN empty or 0: the default 4096)."""
    variables = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        max_length, _, flag = rest.partition(":")
        if (
            not name
            or not (max_length == "" or max_length.isdigit())
            or flag not in ("", "required")
        ):
            raise BadInput(f"--variable {spec!r} is not NAME:MAXLEN[:required]")
        variables.append(
            router_pb2.PromptVariable(
                name=name, max_length=int(max_length or 0), required=flag == "required"
            )
        )
    return variables


def prompts_create(
    stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]
) -> None:
    try:
        source = Path(args.template_file).read_text()
    except OSError as error:
        raise BadInput(f"--template-file {args.template_file}: {error.strerror}") from None
    request = router_pb.CreatePromptTemplateRequest(
        name=args.name,
        template=source,
        system_prompt=args.system or "",
        variables=_variables(args.variable or []),
    )
    reply = stub.CreatePromptTemplate(request, metadata=metadata, timeout=TIMEOUT_S)
    _print(reply.template, args.json, f"created {reply.template.name}@{reply.template.version}")


def prompts_list(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.ListPromptTemplates(
        router_pb.ListPromptTemplatesRequest(), metadata=metadata, timeout=TIMEOUT_S
    )
    _print(reply, args.json, "\n".join(map(_prompt_line, reply.templates)) or "(no templates)")


def prompts_get(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    name, _, version = args.reference.partition("@")
    reply = stub.GetPromptTemplate(
        router_pb.GetPromptTemplateRequest(name=name, version=version),
        metadata=metadata,
        timeout=TIMEOUT_S,
    )
    template = reply.template
    variables = ", ".join(
        f"{v.name}{'' if v.required else '?'} (<= {v.max_length})" for v in template.variables
    )
    text = f"# {template.name}@{template.version}  variables: {variables or 'none'}\n"
    text += f"# system: {template.system_prompt}\n" if template.system_prompt else ""
    _print(template, args.json, text + template.template)


def prompts_alias(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    if args.version is not None and not args.version.isdigit():
        raise BadInput(f"VERSION {args.version!r} is not a version number")
    if args.version is not None and int(args.version) > INT32_MAX:
        raise BadInput(f"VERSION {args.version} is out of range (at most {INT32_MAX})")
    request = router_pb.SetPromptTemplateAliasRequest(
        name=args.name, alias=args.alias, version=int(args.version or 0)
    )
    reply = stub.SetPromptTemplateAlias(request, metadata=metadata, timeout=TIMEOUT_S)
    _print(reply.template, args.json, _prompt_line(reply.template))


def _worker_line(worker: router_pb2.Worker) -> str:
    models = " ".join(f"{m.name}:{m.version}" for m in worker.models)
    state = router_pb2.WorkerState.Name(worker.state).removeprefix("WORKER_STATE_").lower()
    return (
        f"{worker.id:<20} {worker.address:<22} {state:<9} {_load_text(worker):<42} "
        f"{worker.weight:>6}  {models}\n{'':<20} weight: {worker.weight_reason}; "
        f"lease token: {'held' if worker.lease_token_held else 'none (host check only)'}; "
        f"pool: {worker.pool or '(shared worker identity)'}"
    )


def _load_text(worker: router_pb2.Worker) -> str:
    if not worker.HasField("load"):
        return "-"
    load = worker.load
    ttft = (
        f"ttft p50/p99 {load.ttft_p50_ms:.0f}/{load.ttft_p99_ms:.0f}ms"
        if load.ttft_samples
        else "ttft -"
    )
    return (
        f"q {load.queue_depth} run {load.running_sequences}/{load.max_sequences} "
        f"kv {load.kv_utilization:.0%} {ttft}"
    )


WORKERS_HEADER = f"{'ID':<20} {'ADDRESS':<22} {'STATE':<9} {'LOAD':<42} {'WEIGHT':>6}  MODELS"


def workers_list(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.ListWorkers(router_pb.ListWorkersRequest(), timeout=TIMEOUT_S)
    lines = [WORKERS_HEADER, *map(_worker_line, reply.workers)] if reply.workers else []
    _print(reply, args.json, "\n".join(lines) or "(no workers)")


def workers_drain(stub: Any, args: argparse.Namespace, metadata: Sequence[tuple[str, str]]) -> None:
    reply = stub.DrainWorker(router_pb.DrainWorkerRequest(worker_id=args.id), timeout=TIMEOUT_S)
    _print(reply.worker, args.json, f"draining {reply.worker.id}")


# The identity of the service each direct target is (its certificate is verified).
SERVICE_IDENTITIES = {"auth": contract.AUTH, "router": contract.ROUTER}
#: A command prints its answer; it may return the exit code (None: 0).
Command = Callable[[Any, argparse.Namespace, Sequence[tuple[str, str]]], int | None]
# Which service a command group talks to, and its stub.
TARGETS: dict[str, Callable[[grpc.Channel], Any]] = {
    "auth": auth_service_pb2_grpc.AuthServiceStub,
    "edge": router_service_pb2_grpc.RouterServiceStub,
    "router": router_service_pb2_grpc.WorkerRegistryServiceStub,
    "jobs": jobs_service_pb2_grpc.JobsServiceStub,
}
# Targets reached through the edge's listener with the caller's key.
EDGE_TARGETS = frozenset({"edge", "jobs"})


def parser() -> argparse.ArgumentParser:
    """Builds the argument parser."""
    root = argparse.ArgumentParser(prog="tokenmesh", description="Operate a tokenmesh mesh.")
    root.add_argument(
        "--auth-address", default=os.environ.get("TOKENMESH_AUTH_ADDR"), help="auth host:port"
    )
    root.add_argument(
        "--api-key", default=os.environ.get("TOKENMESH_API_KEY"), help="admin API key"
    )
    root.add_argument(
        "--edge-address", default=os.environ.get("TOKENMESH_EDGE_ADDR"), help="edge host:port"
    )
    root.add_argument(
        "--edge-tls",
        action="store_true",
        default=os.environ.get("TOKENMESH_EDGE_TLS", "").lower() not in ("", "0", "false", "no"),
        help="speak TLS to the edge (its 8443 listener; deployments publish only that one)",
    )
    root.add_argument(
        "--edge-plaintext",
        action="store_true",
        help="speak plaintext to a non-loopback --edge-address (by default it gets TLS)",
    )
    root.add_argument(
        "--edge-ca",
        default=os.environ.get("TOKENMESH_EDGE_CA"),
        help="PEM CA to verify the edge with (implies --edge-tls; default: the system's roots)",
    )
    root.add_argument(
        "--router-address", default=os.environ.get("TOKENMESH_ROUTER_ADDR"), help="router host:port"
    )
    root.add_argument(
        "--pki-dir",
        default=os.environ.get("TOKENMESH_PKI_DIR"),
        help="directory with ca.pem, operator.pem, operator-key.pem (default: the local mesh's)",
    )
    root.add_argument("--json", action="store_true", help="print JSON")
    root.set_defaults(target="auth")
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
    create.add_argument("--ttl", type=positive_int, help="lifetime in seconds (above 0)")
    create.add_argument(
        "--pin", action="append", metavar="MODEL=VERSION", help="pin a model's version (repeat)"
    )
    create.set_defaults(run=keys_create)
    listing = keys.add_parser("list", help="list keys (never secrets)")
    listing.add_argument("--tenant")
    listing.set_defaults(run=keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("id")
    revoke.set_defaults(run=keys_revoke)
    rotate = keys.add_parser(
        "rotate", help="issue a new secret; the old ones work for --overlap seconds at most"
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
    subs = [create, listing, revoke, rotate, token_cmd, signing_rotate_cmd]
    subs += _models_parsers(groups)
    subs += _prompts_parsers(groups)
    subs += _workers_parsers(groups)
    subs += _usage_parsers(groups)
    subs += policy_cli.add_parsers(groups)
    subs += jobs_cli.add_parsers(groups)
    for sub in subs:
        # Also after the command; SUPPRESS: when not given there, the subparser leaves
        # the root's --json alone (a default of False overwrote `tokenmesh --json ...`).
        sub.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
        )
    return root


def _models_parsers(groups: Any) -> list[argparse.ArgumentParser]:
    models = groups.add_parser("models", help="the model catalogue (through the edge)")
    models.set_defaults(target="edge")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="models, versions, weights, workers")
    listing.set_defaults(run=models_list)
    split = actions.add_parser("split", help="set traffic weights (they must sum to 100)")
    split.add_argument("model")
    split.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    split.set_defaults(run=models_split)
    pin = actions.add_parser("pin", help="send all traffic to one version (none unpins)")
    pin.add_argument("model")
    pin.add_argument("version", nargs="?")
    pin.set_defaults(run=models_pin)
    deprecate = actions.add_parser("deprecate", help="deprecate a version with a sunset date")
    deprecate.add_argument("model")
    deprecate.add_argument("version")
    deprecate.add_argument("--sunset", required=True, help="YYYY-MM-DD (UTC)")
    deprecate.set_defaults(run=models_deprecate)
    fallback = actions.add_parser("fallback", help="serve another model when none is healthy")
    fallback.add_argument("model")
    fallback.add_argument("fallback", help='fallback model ("" clears it)')
    fallback.set_defaults(run=models_fallback)
    pools = actions.add_parser(
        "pools", help="serve a model only by workers of these pools (worker-<pool> certificates)"
    )
    pools.add_argument("model")
    pools.add_argument("pools", nargs="*", help="worker pools (none: any worker serves it)")
    pools.set_defaults(run=models_pools)
    alias = actions.add_parser("alias", help="point an alias (stable, canary) at a version")
    alias.add_argument("model")
    alias.add_argument("alias")
    alias.add_argument("version", nargs="?")
    alias.set_defaults(run=models_alias)
    register = actions.add_parser("register", help="add a version (0%% of traffic)")
    register.add_argument("model")
    register.add_argument("version")
    register.set_defaults(run=models_register)
    price = actions.add_parser(
        "price", help="set a version's price in USD per million tokens (decimal strings)"
    )
    price.add_argument("model")
    price.add_argument("version")
    price.add_argument("--prompt", help="per million prompt tokens, e.g. 0.15")
    price.add_argument("--completion", help="per million completion tokens, e.g. 0.6")
    price.add_argument(
        "--cached", help="per million cached prompt tokens (default: the prompt price)"
    )
    price.add_argument("--clear", action="store_true", help="remove the version's price")
    price.set_defaults(run=models_price)
    rollout = rollouts.add_parser(actions)
    shadows = shadow_cli.add_parsers(actions)
    return [
        listing,
        split,
        pin,
        deprecate,
        fallback,
        pools,
        alias,
        register,
        price,
        rollout,
        *shadows,
    ]


def _prompts_parsers(groups: Any) -> list[argparse.ArgumentParser]:
    prompts = groups.add_parser("prompts", help="versioned prompt templates (through the edge)")
    prompts.set_defaults(target="edge")
    actions = prompts.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="add a version (1, 2, ...: one more each time)")
    create.add_argument("name")
    create.add_argument("--template-file", required=True, help="the Jinja template")
    create.add_argument("--system", help="the system prompt (may use the variables)")
    create.add_argument(
        "--variable",
        action="append",
        metavar="NAME:MAXLEN[:required]",
        help="declare a variable (repeat); undeclared ones the template uses are required",
    )
    create.set_defaults(run=prompts_create)
    listing = actions.add_parser("list", help="templates, newest versions and aliases")
    listing.set_defaults(run=prompts_list)
    get = actions.add_parser("get", help="one version: NAME, NAME@VERSION or NAME@ALIAS")
    get.add_argument("reference", metavar="NAME[@VERSION|@ALIAS]")
    get.set_defaults(run=prompts_get)
    alias = actions.add_parser("alias", help="point an alias (stable, canary) at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", nargs="?", help="a version number (none removes the alias)")
    alias.set_defaults(run=prompts_alias)
    return [create, listing, get, alias]


def _workers_parsers(groups: Any) -> list[argparse.ArgumentParser]:
    workers = groups.add_parser("workers", help="inference workers (through the router)")
    workers.set_defaults(target="router")
    actions = workers.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="registered workers: leases, load, edge weight and why"
    )
    listing.set_defaults(run=workers_list)
    drain = actions.add_parser("drain", help="stop routing to a worker; it finishes and exits")
    drain.add_argument("id")
    drain.set_defaults(run=workers_drain)
    return [listing, drain]


def _usage_parsers(groups: Any) -> list[argparse.ArgumentParser]:
    usage = groups.add_parser("usage", help="usage metering (reads the mesh's Redis)")
    actions = usage.add_subparsers(dest="action", required=True)
    dead = actions.add_parser("dead-letters", help="usage entries the meter set aside")
    dead.add_argument("--limit", type=positive_int, default=100, help="newest entries to list")
    dead.set_defaults(run=None, local=usage_dead_letters)
    return [dead]


def _redis_url() -> str:
    """Returns $REDIS_URL, else the local mesh's Redis from run/mesh.json."""
    if os.environ.get("REDIS_URL"):
        given = os.environ["REDIS_URL"]
        if not given.startswith(REDIS_SCHEMES):
            # The scheme alone: the rest of a URL may hold a password.
            scheme = given.split("://", 1)[0] if "://" in given else given[:8]
            raise BadInput(
                f"REDIS_URL must start with {', '.join(REDIS_SCHEMES)} (it starts {scheme!r})"
            )
        return given
    url = _manifest_text("redis_url")
    if not url:
        raise Failed(
            f"no REDIS_URL and no local mesh at {_manifest_path()} "
            "(set TOKENMESH_STATE_DIR to its state directory)"
        )
    return str(url)


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """Returns one dead-letter entry as JSON-ready data (the original event in base64)."""
    event = fields.get(b"orig:event", b"")
    unix_ms = int(fields.get(b"unix_ms", b"0"))
    return {
        "id": entry_id.decode(),
        "set_aside_at": datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC).isoformat(),
        "stream_id": fields.get(b"stream_id", b"").decode(),
        "reason": fields.get(b"reason", b"").decode(),
        "detail": fields.get(b"detail", b"").decode(errors="replace"),
        "consumer": fields.get(b"consumer", b"").decode(errors="replace"),
        "request_id": fields.get(b"orig:request_id", b"").decode(errors="replace"),
        "event_base64": base64.b64encode(event).decode(),
    }


def usage_dead_letters(args: argparse.Namespace) -> int:
    """Lists the newest entries of the usage dead-letter stream; returns the exit code."""
    import redis  # only this command needs it

    stream = os.environ.get("TOKENMESH_USAGE_STREAM", "tokenmesh:usage") + ":dead"
    client = redis.Redis.from_url(_redis_url(), socket_timeout=TIMEOUT_S)
    try:
        entries: Any = client.xrevrange(stream, count=args.limit)
    except redis.RedisError as error:
        print(f"tokenmesh: {stream}: {type(error).__name__}: {error}", file=sys.stderr)
        return FAILED
    finally:
        client.close()
    letters = [_dead_letter(entry_id, fields) for entry_id, fields in reversed(entries)]
    if args.json:
        print(json.dumps(letters, indent=2))
        return 0
    for letter in letters:
        print(
            f"{letter['id']}  {letter['set_aside_at']}  {letter['reason']}  "
            f"entry {letter['stream_id']}  request {letter['request_id'] or '-'}  "
            f"{letter['detail']}"
        )
    if not letters:
        print(f"no dead letters in {stream}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs one CLI command; returns the process exit code.

    Errors end in one `tokenmesh: ...` line: 1 when a service or Redis answers
    with an error or not at all, 2 for input the command cannot use
    (services/cli/exits.py).
    """
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        # What was sent stays done (a job submitted keeps running: `tokenmesh jobs get`).
        print("tokenmesh: interrupted", file=sys.stderr)
        return INTERRUPTED
    except CommandError as error:
        print(error.line(), file=sys.stderr)
        return error.exit_code
    except grpc.RpcError as error:
        print(f"tokenmesh: {error.code().name}: {error.details()}", file=sys.stderr)
        return FAILED
    except OSError as error:  # a file named on the command line (FILE.jsonl, --pki-dir)
        print(f"tokenmesh: {_os_error(error)}", file=sys.stderr)
        return BAD_INPUT
    except (ValueError, OverflowError) as error:
        # A value the request cannot carry (--step-seconds 1e300, --window 1e20):
        # protobuf and int() refuse it while the request is built, before it is sent.
        print(f"tokenmesh: invalid value: {error}", file=sys.stderr)
        return BAD_INPUT


def _run(args: argparse.Namespace) -> int:
    command: Command = args.run
    if getattr(args, "local", None) is not None:
        return int(args.local(args))  # reads the mesh's state directly, no service
    with _channel(args) as channel:
        stub = TARGETS[args.target](channel)
        metadata = _metadata(args, command)
        code = command(stub, args, metadata)
    return code or 0


def _os_error(error: OSError) -> str:
    """Returns "PATH: reason" for a file error, else the error's text."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _pki_dir(args: argparse.Namespace) -> Path | None:
    """Returns the directory with the operator's certificate (--pki-dir, or the local mesh's)."""
    if args.pki_dir:
        return Path(args.pki_dir)
    found = _manifest_text("pki_dir")
    return Path(found) if found else None


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Returns a channel to the command's target: the edge's listener, or a service over mTLS.

    Services accept only mesh identities: the CLI presents the operator's certificate.
    The edge takes the caller's key instead; over TLS it is verified as the SDK does.
    """
    address = _address(args)
    if args.target in EDGE_TARGETS and not _edge_tls(args):
        return grpc.insecure_channel(address)
    if args.target in EDGE_TARGETS:
        credentials = grpc.ssl_channel_credentials(root_certificates=_edge_roots(args))
        return grpc.secure_channel(address, credentials)
    pki_dir = _pki_dir(args)
    if pki_dir is None:
        raise BadInput(
            f"the {args.target} service needs the operator certificate "
            "(pass --pki-dir or TOKENMESH_PKI_DIR)"
        )
    files = pki.IdentityFiles.of(pki_dir, contract.OPERATOR)
    missing = [path.name for path in (files.ca, files.cert, files.key) if not path.is_file()]
    if missing:
        raise BadInput(
            f"{pki_dir} holds no operator certificate ({', '.join(missing)} missing; "
            "pass the mesh's --pki-dir or TOKENMESH_PKI_DIR)"
        )
    return identity.blocking_channel(address, files, SERVICE_IDENTITIES[args.target])


def _metadata(args: argparse.Namespace, command: Command) -> list[tuple[str, str]]:
    if command is token or args.target == "router":
        return []
    if args.target in EDGE_TARGETS:
        return [("authorization", f"Bearer {_api_key(args)}")]
    return [("x-api-key", _api_key(args))]


if __name__ == "__main__":
    sys.exit(main())
