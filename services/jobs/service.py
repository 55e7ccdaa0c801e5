"""The jobs service: settings, the runner, the expiry and revoked-key sweeps and webhook
delivery."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from services.core.redis_service import RedisBackedService
from services.core.server import RunningServer, identity_files
from services.core.settings import RedisSettings, SettingsError, env, require
from services.core.tasks import SupervisedTask
from services.jobs.execution import Backoff, ItemExecutor
from services.jobs.handover import SERVICE_NAME as HANDOVER_SERVICE
from services.jobs.handover import HandoverServicer
from services.jobs.openai_batches import BatchStore
from services.jobs.openai_files import FileStore, StorageLedger, StorageQuota
from services.jobs.openai_servicer import SERVICE_NAME as OPENAI_BATCH_SERVICE
from services.jobs.openai_servicer import OpenAIBatchServicer
from services.jobs.runner import KEY_SWEEP_EVERY_S, ExpirySweep, RevokedKeySweep, Runner
from services.jobs.secret_box import SecretBox, key_of_hex
from services.jobs.servicer import JobsServicer
from services.jobs.store import JobStore
from services.jobs.webhooks import DEFAULT_SCHEDULE_S, DeliveryPolicy, WebhookSender
from services.jobs.workers import WorkerDirectory
from tokenmesh.jobs.v1 import handover_service_pb2_grpc, jobs_service_pb2, jobs_service_pb2_grpc
from tokenmesh.openai.v1 import openai_batch_service_pb2_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME = jobs_service_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name


def webhook_lease_s(timeout_s: float) -> float:
    """How long a replica holds a due webhook: past its longest attempt (the lookup,
    bounded by `timeout_s`, and the send, by twice that) with room to record it. A
    lease as long as the attempt let a second replica send the same event while the
    first still waited, and the first's late failure overwrite its success."""
    return 3 * timeout_s + 30.0


@dataclass(frozen=True)
class JobsSettings(RedisSettings):
    """JobsSettings configure the jobs service."""

    consumer: str = env(
        "TOKENMESH_JOBS_CONSUMER",
        socket.gethostname(),
        "This replica's consumer name (unique per replica, stable across its restarts).",
    )
    concurrency: int = env(
        "TOKENMESH_JOBS_CONCURRENCY", 16, "Items in flight on this replica, all tenants together."
    )
    tenant_concurrency: int = env(
        "TOKENMESH_JOBS_TENANT_CONCURRENCY",
        4,
        "Items in flight per tenant (or key without a tenant) on this replica.",
    )
    claim_idle_s: float = env(
        "TOKENMESH_JOBS_CLAIM_IDLE_SECONDS",
        30.0,
        "Items another replica started and left this long are taken over.",
    )
    max_items: int = env("TOKENMESH_JOBS_MAX_ITEMS", 10_000, "The most items one job may have.")
    retention_days: float = env(
        "TOKENMESH_JOBS_RETENTION_DAYS", 7.0, "Finished jobs and their results are kept this long."
    )
    default_window_s: float = env(
        "TOKENMESH_JOBS_DEFAULT_WINDOW_SECONDS",
        86400.0,
        "A job's completion window when it sets none.",
    )
    call_timeout_s: float = env(
        "TOKENMESH_JOBS_CALL_TIMEOUT_SECONDS", 300.0, "The longest one item's call may take."
    )
    webhook_allow_hosts: tuple[str, ...] = env(
        "TOKENMESH_WEBHOOK_ALLOW_HOSTS",
        (),
        "Webhook hosts that may resolve to private and loopback addresses and use http "
        "(comma-separated exact names; e.g. a receiver inside your network); never to a "
        "metadata endpoint, link-local, multicast or unspecified address.",
    )
    webhook_schedule: tuple[str, ...] = env(
        "TOKENMESH_WEBHOOK_RETRY_SCHEDULE",
        tuple(str(s) for s in DEFAULT_SCHEDULE_S),
        "Seconds between webhook attempts (comma-separated; attempts = entries + 1).",
    )
    webhook_timeout_s: float = env(
        "TOKENMESH_WEBHOOK_TIMEOUT_SECONDS", 10.0, "Connect/read timeout of one webhook attempt."
    )
    webhook_max_response_bytes: int = env(
        "TOKENMESH_WEBHOOK_MAX_RESPONSE_BYTES", 65536, "How much of a receiver's answer is read."
    )
    openai_file_max_bytes: int = env(
        "TOKENMESH_OPENAI_FILE_MAX_BYTES",
        8 * 1024 * 1024,
        "The largest batch input file /openai/v1/files accepts (bytes; kept in Redis).",
    )
    openai_storage_bytes_per_owner: int = env(
        "TOKENMESH_OPENAI_STORAGE_BYTES_PER_OWNER",
        64 * 1024 * 1024,
        "What one tenant (or key without one) may keep of OpenAI uploads, batch records, "
        "unfinished jobs' items and jobs' results at once (bytes, in Redis); more is "
        "refused 429, and a job whose results pass it stops.",
    )
    openai_files_per_owner: int = env(
        "TOKENMESH_OPENAI_FILES_PER_OWNER",
        100,
        "OpenAI uploads one tenant (or key without one) may keep at once; more are refused 429.",
    )
    webhook_poll_s: float = env(
        "TOKENMESH_WEBHOOK_POLL_SECONDS", 0.5, "How often due webhooks are looked for."
    )
    webhook_secrets_key: str | None = env(
        "TOKENMESH_WEBHOOK_SECRETS_KEY",
        None,
        "Key (64 hex digits) that seals webhook signing secrets in Redis.",
    )
    webhook_secrets_key_file: Path | None = env(
        "TOKENMESH_WEBHOOK_SECRETS_KEY_FILE",
        None,
        "File holding that key (created if missing); neither set: secrets stored as they are.",
    )
    webhook_secrets_previous_keys: tuple[str, ...] = env(
        "TOKENMESH_WEBHOOK_SECRETS_PREVIOUS_KEYS",
        (),
        "Earlier sealing keys (64 hex digits each, comma-separated) that still open stored"
        " secrets while the key rotates; drop them after `python -m services.jobs.reseal`.",
    )

    def secret_box(self) -> SecretBox | None:
        """Returns the box that seals webhook secrets (None: no key configured)."""
        previous = self.webhook_secrets_previous_keys
        if self.webhook_secrets_key:
            return SecretBox.from_hex(self.webhook_secrets_key, previous)
        if self.webhook_secrets_key_file is not None:
            return SecretBox.from_file(self.webhook_secrets_key_file, previous)
        return None

    def schedule_s(self) -> tuple[float, ...]:
        """Returns the webhook retry schedule in seconds."""
        return tuple(float(s) for s in self.webhook_schedule)

    def __post_init__(self) -> None:
        super().__post_init__()
        # An item's in-flight mark lists consumer names space-separated (store.py).
        require(
            bool(self.consumer) and not any(c.isspace() for c in self.consumer),
            "TOKENMESH_JOBS_CONSUMER",
            "must be a name without spaces",
        )
        require(self.concurrency >= 1, "TOKENMESH_JOBS_CONCURRENCY", "must be >= 1")
        require(self.tenant_concurrency >= 1, "TOKENMESH_JOBS_TENANT_CONCURRENCY", "must be >= 1")
        require(self.claim_idle_s >= 1, "TOKENMESH_JOBS_CLAIM_IDLE_SECONDS", "must be >= 1")
        require(1 <= self.max_items <= 100_000, "TOKENMESH_JOBS_MAX_ITEMS", "must be 1-100000")
        require(self.retention_days > 0, "TOKENMESH_JOBS_RETENTION_DAYS", "must be > 0")
        require(
            60 <= self.default_window_s <= 7 * 86400,
            "TOKENMESH_JOBS_DEFAULT_WINDOW_SECONDS",
            "must be 60-604800",
        )
        require(self.call_timeout_s > 0, "TOKENMESH_JOBS_CALL_TIMEOUT_SECONDS", "must be > 0")
        try:
            schedule = self.schedule_s()
        except ValueError:
            schedule = (-1.0,)
        require(
            all(s >= 0 for s in schedule),
            "TOKENMESH_WEBHOOK_RETRY_SCHEDULE",
            "must be seconds, e.g. 5,30,120",
        )
        require(self.webhook_timeout_s > 0, "TOKENMESH_WEBHOOK_TIMEOUT_SECONDS", "must be > 0")
        require(
            self.webhook_max_response_bytes >= 1,
            "TOKENMESH_WEBHOOK_MAX_RESPONSE_BYTES",
            "must be >= 1",
        )
        require(self.webhook_poll_s > 0, "TOKENMESH_WEBHOOK_POLL_SECONDS", "must be > 0")
        require(
            1024 <= self.openai_file_max_bytes <= 8 * 1024 * 1024,
            "TOKENMESH_OPENAI_FILE_MAX_BYTES",
            "must be 1024-8388608 (the edge buffers uploads up to 8 MiB)",
        )
        require(
            self.openai_storage_bytes_per_owner >= self.openai_file_max_bytes,
            "TOKENMESH_OPENAI_STORAGE_BYTES_PER_OWNER",
            "must be >= TOKENMESH_OPENAI_FILE_MAX_BYTES (room for one upload)",
        )
        require(
            self.openai_files_per_owner >= 1, "TOKENMESH_OPENAI_FILES_PER_OWNER", "must be >= 1"
        )
        if self.webhook_secrets_key:
            try:
                SecretBox.from_hex(self.webhook_secrets_key)
            except ValueError as exc:
                raise SettingsError(f"TOKENMESH_WEBHOOK_SECRETS_KEY: {exc}") from None
        try:
            for previous in self.webhook_secrets_previous_keys:
                key_of_hex(previous)
        except ValueError as exc:
            raise SettingsError(f"TOKENMESH_WEBHOOK_SECRETS_PREVIOUS_KEYS: {exc}") from None


class JobsService(RedisBackedService):
    """JobsService serves tokenmesh.jobs.v1 and runs the jobs' items and webhooks."""

    name = "jobs"

    def __init__(self, settings: JobsSettings) -> None:
        super().__init__(settings)
        self.settings = settings
        box = settings.secret_box()
        if box is None:
            logger.warning(
                "webhook secrets are stored unsealed (TOKENMESH_WEBHOOK_SECRETS_KEY unset)"
            )
        # One ledger: an owner's uploads, batch records, jobs' items and results share
        # its quota.
        quota = StorageQuota(
            settings.openai_storage_bytes_per_owner, settings.openai_files_per_owner
        )
        self.ledger = StorageLedger(self.redis, quota)
        self.store = JobStore(
            self.redis,
            int(settings.retention_days * 86400),
            box,
            settings.openai_storage_bytes_per_owner,
            self.ledger.settle,
        )
        self.executor = ItemExecutor(
            WorkerDirectory(self.redis),
            identity_files(self.name, settings),
            Backoff(),
            settings.call_timeout_s,
        )
        self.runner = Runner(
            self.store,
            self.executor,
            settings.consumer,
            settings.concurrency,
            settings.tenant_concurrency,
            settings.claim_idle_s,
        )
        # The runner's KeyStatus: one cache of verdicts for the items and the sweep.
        self.key_sweep = RevokedKeySweep(self.store, self.runner.key_status)
        self.sender = WebhookSender(
            self.store,
            DeliveryPolicy(
                schedule_s=settings.schedule_s(),
                timeout_s=settings.webhook_timeout_s,
                max_response_bytes=settings.webhook_max_response_bytes,
                allow_hosts=settings.webhook_allow_hosts,
                lease_s=webhook_lease_s(settings.webhook_timeout_s),
            ),
        )
        self._tasks: list[SupervisedTask] = []
        self._openai_batches: OpenAIBatchServicer | None = None  # made by add_to_server

    def service_names(self) -> Sequence[str]:
        return [SERVICE_NAME, OPENAI_BATCH_SERVICE, HANDOVER_SERVICE]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ledger = self.ledger
        jobs = JobsServicer(
            self.store,
            self.settings.max_items,
            self.settings.default_window_s,
            self.settings.webhook_allow_hosts,
            ledger,
        )
        jobs_service_pb2_grpc.add_JobsServiceServicer_to_server(jobs, server)
        retention_s = self.store.retention_s
        self._openai_batches = OpenAIBatchServicer(
            self.store,
            FileStore(self.redis, retention_s, ledger),
            BatchStore(self.redis, retention_s, ledger),
            self.settings.max_items,
            self.settings.openai_file_max_bytes,
        )
        openai_batch_service_pb2_grpc.add_OpenAIBatchServiceServicer_to_server(
            self._openai_batches, server
        )
        handover_service_pb2_grpc.add_HandoverServiceServicer_to_server(
            HandoverServicer(jobs, self.store), server
        )

    async def start(self, running: RunningServer) -> None:
        await super().start(running)
        maintain_s = self.settings.claim_idle_s / 3
        self._tasks = [
            self.tasks.spawn("jobs-runner", self.runner.run_forever),
            self.tasks.spawn("jobs-maintain", lambda: self.runner.maintain_forever(maintain_s)),
            self.tasks.spawn("jobs-expiry", lambda: ExpirySweep(self.store).run_forever(1.0)),
            self.tasks.spawn(
                "jobs-revoked-keys", lambda: self.key_sweep.run_forever(KEY_SWEEP_EVERY_S)
            ),
            self.tasks.spawn(
                "jobs-webhooks", lambda: self.sender.run_forever(self.settings.webhook_poll_s)
            ),
        ]

    async def stop(self) -> None:
        # Before the Redis client closes (super().stop()): whatever still uses it after
        # that opens a new connection that nothing closes.
        if self._openai_batches is not None:
            await self._openai_batches.stop()
        for task in self._tasks:
            await task.stop(timeout_s=5)
        await self.runner.stop()
        await self.executor.close()
        await self.sender.close()
        await super().stop()
