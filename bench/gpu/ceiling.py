"""Prints one engine's in-process ceiling (tokens/s at batch 1, 8, 32) as JSON.

`python -m bench.gpu.ceiling tensorrt|onnxruntime`; run by bench/gpu/readiness.py
in its own process so that a crash in one engine does not end the report.
"""

from __future__ import annotations

import json
import sys

from bench.ceiling import engine_ceiling


def main() -> None:
    """Measures the engine named on the command line."""
    kind = sys.argv[1] if len(sys.argv) > 1 else "onnxruntime"
    print(json.dumps({kind: engine_ceiling((1, 8, 32), kind=kind)}), flush=True)


if __name__ == "__main__":
    main()
