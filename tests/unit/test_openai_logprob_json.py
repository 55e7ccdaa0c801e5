"""OpenAI logprobs are strict JSON: a non-finite logprob never becomes -Infinity."""

from __future__ import annotations

import json
import math
import sys

from services.inference.openai import shapes
from tokenmesh.inference.v2 import inference_pb2


def _strict(body: bytes) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not JSON: {name}")

    return json.loads(body, parse_constant=refuse)


def test_a_minus_infinite_logprob_is_written_as_the_most_negative_float():
    item = inference_pb2.TokenLogprob(token="a", token_id=1, logprob=-math.inf)
    item.top_logprobs.add(token="b", token_id=2, logprob=-0.5)
    item.top_logprobs.add(token="c", token_id=3, logprob=-math.inf)
    chat = _strict(shapes.json_bytes(shapes.chat_logprobs([item])))
    legacy = _strict(shapes.json_bytes(shapes.completion_logprobs([item], 0)))
    assert isinstance(chat, dict) and isinstance(legacy, dict)
    entry = chat["content"][0]
    assert entry["logprob"] == -sys.float_info.max
    assert [top["logprob"] for top in entry["top_logprobs"]] == [-0.5, -sys.float_info.max]
    assert legacy["token_logprobs"] == [-sys.float_info.max]
    # The sampled token "a" too: OpenAI always adds it (up to logprobs+1 entries).
    assert legacy["top_logprobs"] == [
        {"b": -0.5, "c": -sys.float_info.max, "a": -sys.float_info.max}
    ]


def test_a_legacy_positions_alternatives_hold_the_sampled_token_once():
    # Scoring code reads top_logprobs[i][tokens[i]]: a KeyError at 9 of 20 positions.
    outside = inference_pb2.TokenLogprob(token="x", token_id=9, logprob=-3.0)
    outside.top_logprobs.add(token="y", token_id=2, logprob=-0.1)
    inside = inference_pb2.TokenLogprob(token="y", token_id=2, logprob=-0.1)
    inside.top_logprobs.add(token="y", token_id=2, logprob=-0.1)
    alone = inference_pb2.TokenLogprob(token="z", token_id=3, logprob=-1.0)  # logprobs: 0
    legacy = shapes.completion_logprobs([outside, inside, alone], 0)
    assert legacy["top_logprobs"] == [{"y": -0.1, "x": -3.0}, {"y": -0.1}, {"z": -1.0}]
