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
    assert legacy["top_logprobs"] == [{"b": -0.5, "c": -sys.float_info.max}]
