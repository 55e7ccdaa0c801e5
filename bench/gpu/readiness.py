"""GPU readiness: what a machine with an NVIDIA GPU has, and what of ours runs on it.

Run it on a GPU machine (`make gpu-readiness`, or `bash bench/gpu/run.sh`):
it installs nothing, takes a few minutes at most, and prints one line per
check, `OK`, `FAIL` or `NOT CHECKED` with the reason, then a summary.

1. What is present: the NVIDIA driver (nvidia-smi, libcuda), the CUDA
   runtime, TensorRT, pycuda and cupy.
2. The CUDA path the TensorRT engine uses, through the driver API alone
   (ctypes over libcuda, so it needs no Python package): page-locked host
   buffers, device buffers, one stream, asynchronous uploads and downloads of
   one decode step's KV slice for demo-lm, checked byte for byte, and the
   copy bandwidth.
3. When TensorRT and pycuda import: the TensorRT engine's tests
   (tests/unit/test_engines.py) and an engine ceiling (tokens/s at batch 1,
   8, 32) beside the ONNX Runtime one.

The exit status is 0 when every check that could run passed (checks that
could not run are reported, not failed), 1 otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_LM = REPO_ROOT / "models" / "demo-lm" / "1"
COMMAND_TIMEOUT_S = 240


@dataclass
class Report:
    """Report collects the outcome of every check, in order."""

    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, outcome: str, check: str, detail: str) -> None:
        """Records and prints one check's outcome (OK, FAIL or NOT CHECKED)."""
        self.lines.append((outcome, check, detail))
        print(f"{outcome:<12} {check}: {detail}", flush=True)

    def failed(self) -> bool:
        """Tells whether any check that ran failed."""
        return any(outcome == "FAIL" for outcome, _, _ in self.lines)

    def summary(self) -> str:
        """Returns counts per outcome."""
        counts = {o: sum(1 for x, _, _ in self.lines if x == o) for o in ("OK", "FAIL")}
        skipped = sum(1 for x, _, _ in self.lines if x == "NOT CHECKED")
        return f"{counts['OK']} ok, {counts['FAIL']} failed, {skipped} not checked"


def _run(command: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, f"{type(exc).__name__}: {exc}"
    return done.returncode, (done.stdout + done.stderr).strip()


def check_driver(report: Report) -> None:
    """Reports nvidia-smi's view of the GPUs and the driver version."""
    if shutil.which("nvidia-smi") is None:
        report.add("NOT CHECKED", "nvidia-smi", "not on PATH (no NVIDIA driver tools here)")
        return
    query = "--query-gpu=name,driver_version,memory.total,compute_cap"
    code, out = _run(["nvidia-smi", query, "--format=csv,noheader"])
    report.add("OK" if code == 0 else "FAIL", "nvidia-smi", out.replace("\n", "; ")[:300])


def check_modules(report: Report) -> dict[str, bool]:
    """Reports which Python GPU packages import, with their versions."""
    present = {}
    for name in ("tensorrt", "pycuda", "cupy", "onnxruntime"):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # any import failure means "not usable here"
            present[name] = False
            report.add("NOT CHECKED", f"import {name}", f"{type(exc).__name__}: {exc}"[:200])
            continue
        present[name] = True
        report.add("OK", f"import {name}", str(getattr(module, "__version__", "?")))
    if present.get("onnxruntime"):
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        report.add("OK", "onnxruntime providers", providers)
    return present


class CudaDriver:
    """CudaDriver calls the CUDA driver API (libcuda) through ctypes."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library

    @classmethod
    def load(cls) -> CudaDriver | None:
        """Returns the driver API, or None when libcuda is not installed."""
        for name in ("libcuda.so.1", ctypes.util.find_library("cuda")):
            if not name:
                continue
            try:
                return cls(ctypes.CDLL(name))
            except OSError:
                continue
        return None

    def call(self, function: str, *args: object) -> None:
        """Calls one driver function; raises RuntimeError naming the CUresult on failure."""
        result = getattr(self._lib, function)(*args)
        if result != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{function} failed: {(name.value or b'?').decode()} ({result})")


def _kv_step_bytes() -> int:
    """Returns the bytes of one decode step's KV slice for demo-lm at batch 32, fp16."""
    try:
        card = json.loads((DEMO_LM / "config.json").read_text())
        per_token = 2 * card["n_layer"] * card["n_head"] * card["head_dim"] * 2
        return int(per_token * card["context_length"] * 32)
    except (OSError, KeyError, ValueError):
        return 64 << 20


def check_cuda_copies(report: Report, driver: CudaDriver) -> None:
    """Uploads and downloads a KV-sized buffer on one stream, as the engine does."""
    size = _kv_step_bytes()
    context, stream = ctypes.c_void_p(), ctypes.c_void_p()
    host_in, host_out, device = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint64()
    driver.call("cuInit", 0)
    count = ctypes.c_int()
    driver.call("cuDeviceGetCount", ctypes.byref(count))
    report.add("OK" if count.value else "FAIL", "CUDA devices", str(count.value))
    if not count.value:
        return
    dev = ctypes.c_int()
    driver.call("cuDeviceGet", ctypes.byref(dev), 0)
    driver.call("cuDevicePrimaryCtxRetain", ctypes.byref(context), dev)
    driver.call("cuCtxSetCurrent", context)
    try:
        driver.call("cuMemAllocHost_v2", ctypes.byref(host_in), ctypes.c_size_t(size))
        driver.call("cuMemAllocHost_v2", ctypes.byref(host_out), ctypes.c_size_t(size))
        driver.call("cuMemAlloc_v2", ctypes.byref(device), ctypes.c_size_t(size))
        driver.call("cuStreamCreate", ctypes.byref(stream), 0)
        pattern = os.urandom(4096) * (size // 4096)
        ctypes.memmove(host_in, pattern, len(pattern))
        started = time.perf_counter()
        rounds = 10
        for _ in range(rounds):
            driver.call("cuMemcpyHtoDAsync_v2", device, host_in, ctypes.c_size_t(size), stream)
            driver.call("cuMemcpyDtoHAsync_v2", host_out, device, ctypes.c_size_t(size), stream)
        driver.call("cuStreamSynchronize", stream)
        elapsed = time.perf_counter() - started
        same = ctypes.string_at(host_out, len(pattern)) == pattern
        gb_s = 2 * rounds * size / elapsed / 1e9
        detail = f"{size >> 20} MiB each way x{rounds}, {gb_s:.1f} GB/s, bytes equal: {same}"
        report.add("OK" if same else "FAIL", "pinned async copies on one stream", detail)
    finally:
        for free, pointer in (
            ("cuMemFree_v2", device),
            ("cuMemFreeHost", host_in),
            ("cuMemFreeHost", host_out),
        ):
            if pointer.value:
                driver.call(free, pointer)
        if stream.value:
            driver.call("cuStreamDestroy_v2", stream)
        driver.call("cuDevicePrimaryCtxRelease_v2", dev)


def check_tensorrt_engine(report: Report) -> None:
    """Runs the TensorRT engine's tests and an engine ceiling beside ONNX Runtime's."""
    code, out = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "tensorrt",
         str(REPO_ROOT / "tests" / "unit" / "test_engines.py")]
    )  # fmt: skip
    last = out.splitlines()[-1] if out else ""
    passed = code == 0 and "skipped" not in last
    report.add("OK" if passed else "FAIL", "TensorRT engine tests", last[:300])
    for engine in ("onnxruntime", "tensorrt"):
        code, out = _run([sys.executable, "-m", "bench.gpu.ceiling", engine])
        report.add("OK" if code == 0 else "FAIL", f"engine ceiling ({engine})", out[-400:])


def main() -> int:
    """Runs every check that this machine allows; returns the exit status."""
    report = Report()
    check_driver(report)
    present = check_modules(report)
    driver = CudaDriver.load()
    steps: list[tuple[str, Callable[[], None] | None, str]] = [
        (
            "CUDA driver API copies",
            (lambda: check_cuda_copies(report, driver)) if driver else None,
            "libcuda.so.1 is not installed (no NVIDIA driver)",
        ),
        (
            "TensorRT engine",
            (lambda: check_tensorrt_engine(report))
            if present.get("tensorrt") and present.get("pycuda")
            else None,
            "needs the tensorrt and pycuda packages (not on the registries we reach)",
        ),
    ]
    for check, run, why_not in steps:
        if run is None:
            report.add("NOT CHECKED", check, why_not)
            continue
        try:
            run()
        except Exception as exc:  # report every failure and go on to the next check
            report.add("FAIL", check, f"{type(exc).__name__}: {exc}"[:300])
    print(f"\nGPU readiness: {report.summary()}", flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
