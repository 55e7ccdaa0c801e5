"""TensorRT engine (GPU): a plan built from the same ONNX, cached, run with pycuda.

Imported lazily, only when `TOKENMESH_ENGINE` selects TensorRT: TensorRT's
libraries are not on any registry our machines reach, so nothing else may
depend on this module. The plan is built once with optimisation profiles
covering batch, sequence and past ranges, and cached under a key of the
model's hash, the GPU and the TensorRT version.

The KV cache stays in host memory (as in the ONNX engine); each step copies
its slice into pinned buffers, uploads it on one CUDA stream, runs
`execute_async_v3`, and downloads logits and the new key/value columns.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.core.secret_files import replace_file
from services.inference.engines.base import GenerativeEngine, StepItem

logger = logging.getLogger(__name__)


def tensorrt_available() -> tuple[bool, str]:
    """Tells whether TensorRT and a CUDA GPU are usable here, and if not, why."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return False, "no CUDA GPU is visible"
    except Exception as exc:  # pycuda raises its own error types when no driver exists
        return False, f"CUDA is unavailable ({type(exc).__name__})"
    return True, "TensorRT and a CUDA GPU are available"


def plan_cache_key(
    onnx_bytes: bytes, gpu_name: str, compute_capability: str, trt_version: str
) -> str:
    """Returns the cache key of a plan: model hash + GPU + TensorRT version."""
    digest = hashlib.sha256(onnx_bytes).hexdigest()[:16]
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-").lower()
    return f"{digest}-{gpu}-sm{compute_capability}-trt{trt_version}"


def store_plan(path: Path, plan: bytes) -> None:
    """Writes a built plan to the cache as a whole or not at all.

    Written in place, a plan cut short (a worker stopped mid-write: its build is
    abandoned and the process exits without waiting, services.core.tasks) stayed
    at its final name, failed to load at every later start and kept the version
    FAILED until someone deleted it. A temporary file in the same directory,
    flushed, then renamed over the name: a reader sees the old file or the new.
    """
    replace_file(path, plan)


class TensorRTGenerativeEngine(GenerativeEngine):
    """TensorRTGenerativeEngine runs the KV-cached decoder on a GPU."""

    name = "tensorrt"

    def __init__(
        self,
        model_path: Path,
        *,
        n_layer: int,
        n_head: int,
        head_dim: int,
        vocab_size: int,
        context_length: int,
        cache_dir: Path | None = None,
        max_batch: int = 32,
    ) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        self._cuda = cuda
        self._trt = trt
        self._device_context = cuda.Device(0).retain_primary_context()
        self._device_context.push()
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.vocab_size, self.context_length = vocab_size, context_length
        self.max_batch = max_batch
        self._past_names = [
            f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")
        ]
        self._present_names = [
            f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")
        ]
        plan_path, plan = self._load_or_build_plan(
            model_path, cache_dir or model_path.parent / ".trt-cache"
        )
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None and plan_path is not None:
            # A cached plan TensorRT cannot read (cut short by an older release's
            # in-place write, or corrupted): a cache miss, not a version that fails
            # at every start.
            logger.warning("TensorRT plan cache %s unreadable: rebuilt", plan_path.name)
            plan_path.unlink(missing_ok=True)
            _, plan = self._load_or_build_plan(model_path, plan_path.parent)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._cache: list[np.ndarray] = []
        self._device_context.pop()

    def _load_or_build_plan(self, model_path: Path, cache_dir: Path) -> tuple[Path | None, bytes]:
        """Returns the cached plan (and its path), or builds and caches one (None)."""
        onnx_bytes = model_path.read_bytes()
        device = self._cuda.Device(0)
        major, minor = device.compute_capability()
        key = plan_cache_key(onnx_bytes, device.name(), f"{major}{minor}", self._trt.__version__)
        path = cache_dir / f"{key}.plan"
        if path.is_file():
            logger.info("TensorRT plan cache hit: %s", path.name)
            return path, path.read_bytes()
        logger.info("building TensorRT plan %s (first start on this GPU)", path.name)
        plan = self._build_plan(onnx_bytes)
        store_plan(path, plan)
        return None, plan

    def _build_plan(self, onnx_bytes: bytes) -> bytes:
        trt = self._trt
        logger_ = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger_)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger_)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        ctx, b = self.context_length, self.max_batch
        # Two profiles: decode (seq 1, any past) and prefill (batch 1, any seq).
        for batch, seq in (((1, b, b), (1, 1, 1)), ((1, 1, 1), (1, ctx // 4, ctx))):
            profile = builder.create_optimization_profile()
            profile.set_shape(
                "input_ids", (batch[0], seq[0]), (batch[1], seq[1]), (batch[2], seq[2])
            )
            profile.set_shape(
                "position_ids", (batch[0], seq[0]), (batch[1], seq[1]), (batch[2], seq[2])
            )
            profile.set_shape(
                "attention_mask", (batch[0], 1), (batch[1], ctx // 2), (batch[2], ctx + seq[2])
            )
            for name in self._past_names:
                dims = (self.n_head, self.head_dim)
                profile.set_shape(
                    name,
                    (batch[0], dims[0], 0, dims[1]),
                    (batch[1], dims[0], ctx // 2, dims[1]),
                    (batch[2], dims[0], ctx, dims[1]),
                )
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT failed to build a plan")
        return bytes(serialized)

    def allocate(self, max_slots: int) -> None:
        shape = (max_slots, self.n_head, self.context_length, self.head_dim)
        self._cache = [np.zeros(shape, np.float32) for _ in self._past_names]

    def forward(self, items: Sequence[StepItem]) -> np.ndarray:
        logits = np.empty((len(items), self.vocab_size), np.float32)
        for row, item in enumerate(items):  # prefill and decode share one path here
            logits[row] = self._run_one(item)
        return logits

    def _run_one(self, item: StepItem) -> np.ndarray:
        """Runs one sequence's tokens: host KV slice in, logits and new KV out."""
        cuda = self._cuda
        n, start = len(item.token_ids), item.start
        inputs: dict[str, np.ndarray] = {
            "input_ids": np.asarray([item.token_ids], np.int64),
            "attention_mask": np.ones((1, start + n), np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
        }
        for name, cache in zip(self._past_names, self._cache, strict=True):
            inputs[name] = np.ascontiguousarray(cache[item.slot : item.slot + 1, :, :start])
        self._device_context.push()
        try:
            self._context.set_optimization_profile_async(0 if n == 1 else 1, self._stream.handle)
            buffers: list[Any] = []
            for name, host in inputs.items():
                self._context.set_input_shape(name, host.shape)
                pinned = cuda.pagelocked_empty(host.shape, host.dtype)
                pinned[...] = host
                device = cuda.mem_alloc(max(pinned.nbytes, 1))
                cuda.memcpy_htod_async(device, pinned, self._stream)
                self._context.set_tensor_address(name, int(device))
                buffers.append((pinned, device))
            outputs = {}
            for name in ["logits", *self._present_names]:
                shape = tuple(self._context.get_tensor_shape(name))
                pinned = cuda.pagelocked_empty(shape, np.float32)
                device = cuda.mem_alloc(max(pinned.nbytes, 1))
                self._context.set_tensor_address(name, int(device))
                outputs[name] = (pinned, device)
            if not self._context.execute_async_v3(self._stream.handle):
                raise RuntimeError("TensorRT execution failed")
            for pinned, device in outputs.values():
                cuda.memcpy_dtoh_async(pinned, device, self._stream)
            self._stream.synchronize()
        finally:
            self._device_context.pop()
        for name, cache in zip(self._present_names, self._cache, strict=True):
            cache[item.slot, :, start : start + n] = outputs[name][0][0, :, start : start + n]
        logits: np.ndarray = outputs["logits"][0][0, -1].copy()
        return logits
