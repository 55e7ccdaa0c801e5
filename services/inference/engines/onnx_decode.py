"""In-place decode for ONNX Runtime: demo-lm's decoder rebuilt around GroupQueryAttention.

The exported graph (tools/models/demo_lm.py) takes past KV and returns
present = concat(past, new): every decode step copies every row's whole
history, and a continuous batch pads each row to the longest one. The graph
built here computes the same function for one token per row with ONNX
Runtime's GroupQueryAttention (com.microsoft), whose CPU kernel:

- writes the new key/value column into the cache at each row's own position
  when past and present are bound to the same buffer (no copy of history);
- attends to each row's own length (seqlens_k), so rows are never padded.

The engine binds the slot cache itself as past and present: a decode step
over slots lo..hi-1 passes the cache's contiguous [lo:hi] slab.

Weights are taken from the exported graph (by name, and the four linear
layers of each block in graph order), so both graphs always hold the same
model; a graph of another shape raises UnsupportedGraph and the engine keeps
the padded path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class UnsupportedGraph(ValueError):
    """UnsupportedGraph: the exported graph is not demo-lm's shape (gpt-kv)."""


@dataclass(frozen=True)
class DecodeShape:
    """DecodeShape is what the in-place graph needs of the model card."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int


def build_decode_graph(model_path: Path, shape: DecodeShape) -> onnx.ModelProto:
    """Returns a one-token-per-row decoder with the exported graph's weights.

    Inputs: input_ids and position_ids [rows, 1] int64; seqlens_k [rows] int32
    (each row's new position); total_sequence_length (int32 scalar, > every
    seqlens_k); past_key_values.{i}.key/value [rows, heads, positions,
    head_dim]. Outputs: logits [rows, 1, vocab] and present.{i}.key/value,
    to be bound to the past buffers.
    """
    exported = onnx.load(str(model_path))
    graph = _Builder(exported, shape)
    return graph.model()


class _Builder:
    """_Builder assembles the decode graph node by node."""

    def __init__(self, exported: onnx.ModelProto, shape: DecodeShape) -> None:
        self.shape = shape
        self.weights = {t.name: t for t in exported.graph.initializer}
        self.epsilon = {
            node.input[1]: helper.get_attribute_value(attribute)
            for node in exported.graph.node
            if node.op_type == "LayerNormalization"
            for attribute in node.attribute
            if attribute.name == "epsilon"
        }
        # The exporter names biases after the module but the transposed weight
        # matrices val_N: take those in order, four per block.
        matrices = [
            node.input[1]
            for node in exported.graph.node
            if node.op_type == "MatMul" and node.input[1] in self.weights
        ]
        if len(matrices) != 4 * shape.n_layer:
            raise UnsupportedGraph(f"{len(matrices)} weight matrices, expected {4 * shape.n_layer}")
        self.matrices = matrices
        self._check_matrices()
        self.nodes: list[onnx.NodeProto] = []
        self.used: dict[str, onnx.TensorProto] = {}

    def model(self) -> onnx.ModelProto:
        s = self.shape
        width = s.n_head * s.head_dim
        kv: list[str | int | None] = ["rows", s.n_head, "positions", s.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["rows", 1]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["rows", 1]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["rows"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", 1, s.vocab_size])
        ]
        self._constant("qkv_split", np.array([width] * 3, np.int64))
        self._node("Gather", [self._weight("wte.weight"), "input_ids"], "tokens", axis=0)
        self._node("Gather", [self._weight("wpe.weight"), "position_ids"], "places", axis=0)
        x = self._node("Add", ["tokens", "places"], "embedded")
        for i in range(s.n_layer):
            for name in (f"past_key_values.{i}.key", f"past_key_values.{i}.value"):
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, kv))
            for name in (f"present.{i}.key", f"present.{i}.value"):
                outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, kv))
            x = self._block(i, x)
        final = self._layer_norm(x, "ln_f", "final")
        wte = numpy_helper.to_array(self._weight_tensor("wte.weight"))
        if wte.shape != (s.vocab_size, width):
            raise UnsupportedGraph(f"wte.weight is {wte.shape}, expected {(s.vocab_size, width)}")
        self._constant("unembed", np.ascontiguousarray(wte.T))  # tied embeddings
        self._node("MatMul", [final, "unembed"], "logits")
        graph = helper.make_graph(
            self.nodes, "demo-lm-decode-in-place", inputs, outputs, list(self.used.values())
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
            ir_version=10,
        )
        onnx.checker.check_model(model)
        return model

    def _check_matrices(self) -> None:
        """Each block's four matrices must be qkv [d, 3d], proj [d, d], up [d, h], down [h, d]."""
        d = self.shape.n_head * self.shape.head_dim
        for i in range(self.shape.n_layer):
            qkv, proj, up, down = (
                tuple(self.weights[name].dims) for name in self.matrices[4 * i : 4 * i + 4]
            )
            hidden = up[1] if len(up) == 2 else -1
            if (qkv, proj, up, down) != ((d, 3 * d), (d, d), (d, hidden), (hidden, d)):
                raise UnsupportedGraph(f"block {i}'s matrices are {qkv}, {proj}, {up}, {down}")

    def _block(self, i: int, x: str) -> str:
        p = f"blocks.{i}"
        qkv_w, proj_w, up_w, down_w = self.matrices[4 * i : 4 * i + 4]
        qkv = self._linear(self._layer_norm(x, f"{p}.ln1", f"b{i}.ln1"), qkv_w, f"{p}.qkv")
        q, k, v = f"b{i}.q", f"b{i}.k", f"b{i}.v"
        self.nodes.append(helper.make_node("Split", [qkv, "qkv_split"], [q, k, v], axis=-1))
        self.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
                + ["seqlens_k", "total_sequence_length"],
                [f"b{i}.attended", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft",
                num_heads=self.shape.n_head,
                kv_num_heads=self.shape.n_head,
            )
        )
        attended = self._linear(f"b{i}.attended", proj_w, f"{p}.proj")
        x = self._node("Add", [x, attended], f"b{i}.residual")
        up = self._linear(self._layer_norm(x, f"{p}.ln2", f"b{i}.ln2"), up_w, f"{p}.mlp.0")
        self.nodes.append(helper.make_node("Gelu", [up], [f"b{i}.gelu"], approximate="tanh"))
        down = self._linear(f"b{i}.gelu", down_w, f"{p}.mlp.2")
        return self._node("Add", [x, down], f"b{i}.out")

    def _layer_norm(self, x: str, module: str, out: str) -> str:
        weight = f"{module}.weight"
        if weight not in self.epsilon:
            raise UnsupportedGraph(f"no LayerNormalization with {weight}")
        return self._node(
            "LayerNormalization",
            [x, self._weight(weight), self._weight(f"{module}.bias")],
            out,
            axis=-1,
            epsilon=self.epsilon[weight],
        )

    def _linear(self, x: str, matrix: str, module: str) -> str:
        product = self._node("MatMul", [x, self._weight(matrix)], f"{module}.product")
        return self._node("Add", [product, self._weight(f"{module}.bias")], f"{module}.out")

    def _node(self, op: str, inputs: list[str], out: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    def _weight_tensor(self, name: str) -> onnx.TensorProto:
        if name not in self.weights:
            raise UnsupportedGraph(f"no initializer {name}")
        return self.weights[name]

    def _weight(self, name: str) -> str:
        self.used[name] = self._weight_tensor(name)
        return name

    def _constant(self, name: str, value: np.ndarray) -> None:
        self.used[name] = numpy_helper.from_array(value, name)


class InPlaceDecoder:
    """InPlaceDecoder runs decode steps on the engine's slot cache, in place.

    Args:
        session: a session of build_decode_graph's model.
        cache: the engine's per-layer KV arrays [slots, heads, positions,
            head_dim] (key, value, key, ...); a step over slots lo..hi-1
            reads and writes their [lo:hi] slabs.
        vocab_size: the logits' width.
    """

    #: bindings kept (one per slab; with the scheduler's compaction, slabs start at slot 0)
    MAX_BINDINGS = 64

    def __init__(self, session: ort.InferenceSession, cache: list[np.ndarray], vocab_size: int):
        self.session = session
        self.cache = cache
        self._logits = np.empty((len(cache[0]), 1, vocab_size), np.float32)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        # The step's inputs: ONNX Runtime reads them in place, so they must
        # outlive the binding call (a temporary could be freed before the run).
        self._fed: tuple[np.ndarray, ...] = ()

    def step(
        self, lo: int, ids: np.ndarray, positions: np.ndarray, seqlens: np.ndarray
    ) -> np.ndarray:
        """Feeds ids [rows] at positions [rows] for slots lo..lo+rows-1; each row
        writes its key/value at seqlens[row] and attends to 0..seqlens[row].
        Returns logits [rows, vocab] (a view valid until the next step)."""
        rows = len(ids)
        binding = self._binding(lo, lo + rows)
        self._fed = fed = (
            np.ascontiguousarray(ids[:, None]),
            np.ascontiguousarray(positions[:, None]),
            seqlens.astype(np.int32),
            np.array(seqlens.max() + 1, np.int32),
        )
        for name, value in zip(_FED, fed, strict=True):
            binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(binding)
        return self._logits[:rows, 0]

    def _binding(self, lo: int, hi: int) -> ort.IOBinding:
        """Returns the binding of slots lo..hi-1 (the cache slabs as past and present)."""
        found = self._bindings.get((lo, hi))
        if found is not None:
            return found
        if len(self._bindings) >= self.MAX_BINDINGS:
            self._bindings.clear()
        binding = self.session.io_binding()
        for i, array in enumerate(self.cache):
            slab = array[lo:hi]  # contiguous: slots are the leading axis
            name = f"{i // 2}.{('key', 'value')[i % 2]}"
            for bound in (f"past_key_values.{name}", f"present.{name}"):
                bind = binding.bind_input if bound.startswith("past") else binding.bind_output
                bind(bound, "cpu", 0, np.float32, list(slab.shape), slab.ctypes.data)
        logits = self._logits[: hi - lo]  # a prefix of the buffer: contiguous
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._bindings[(lo, hi)] = binding
        return binding


_FED = ("input_ids", "position_ids", "seqlens_k", "total_sequence_length")
