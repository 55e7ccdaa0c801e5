"""Engines behind one interface: ONNX Runtime (CPU, default), TensorRT (GPU),
and the deterministic test engine."""
