"""A token's bytes: its piece when the tokenizer has pieces, else its text's UTF-8.

The exact bytes of a real worker's answers are in
tests/integration/test_logprob_bytes.py.
"""

from __future__ import annotations

from services.inference.logprobs import token_bytes
from services.inference.openai import shapes
from tokenmesh.inference.v2 import inference_pb2


def test_a_piece_is_the_bytes_and_without_one_the_text_is():
    pieces = [b"", b"\xc3", b"\xa9"]
    assert token_bytes(pieces, 1, "\ufffd") == b"\xc3"
    assert token_bytes(pieces, 0, "") == b""
    assert token_bytes(None, 5, "\u00e9") == b"\xc3\xa9"  # a tokenizer without pieces
    assert token_bytes(pieces, 7, "") == b"", "an id past the pieces (padded logits)"


def test_openai_bytes_come_from_token_bytes_or_from_an_older_answers_text():
    exact = inference_pb2.TokenLogprob(
        token="\ufffd",
        token_bytes=b"\xc3",
        top_logprobs=[inference_pb2.TopLogprob(token="\ufffd", token_bytes=b"\xa9")],
    )
    cached = inference_pb2.TokenLogprob(
        token=" the", top_logprobs=[inference_pb2.TopLogprob(token="\ufffd")]
    )
    exact_item, cached_item = shapes.chat_logprobs([exact, cached])["content"]
    assert exact_item["bytes"] == [0xC3]
    assert exact_item["top_logprobs"][0]["bytes"] == [0xA9]
    assert cached_item["bytes"] == list(b" the")
    assert cached_item["top_logprobs"][0]["bytes"] == list("\ufffd".encode())
