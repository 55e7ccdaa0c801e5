"""OpenAI's response objects, built from inference v2 messages, and their bytes.

Objects are plain dicts in OpenAI's key order, serialised compactly. A
stream is Server-Sent Events: `data: <json>\\n\\n` per chunk, then
`data: [DONE]\\n\\n`; never an `event:` line (OpenAI clients treat one as an
error).
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from tokenmesh.inference.v2 import inference_pb2
from tokenmesh.inference.v2 import inference_service_pb2 as pb
from tokenmesh.type.v1 import types_pb2

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
DONE = b"data: [DONE]\n\n"
OWNER = "tokenmesh"
# v2 finish reasons as OpenAI's: a spent token budget ends a choice like max_tokens.
FINISH_REASONS: dict[int, str] = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_QUOTA: "length",
    inference_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
}

Json = dict[str, Any]


def json_bytes(value: Any) -> bytes:
    """Returns compact UTF-8 JSON."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def sse(value: Any) -> bytes:
    """Returns one Server-Sent Event carrying `value` as JSON."""
    return b"data: " + json_bytes(value) + b"\n\n"


def model_id(ref: types_pb2.ModelRef) -> str:
    """Returns the OpenAI id of a served version: "name@version"."""
    return f"{ref.name}@{ref.version}"


def finish_reason(value: int) -> str:
    """Returns OpenAI's finish_reason for a v2 FinishReason."""
    return FINISH_REASONS.get(value, "stop")


def usage(usages: Iterable[inference_pb2.Usage]) -> Json:
    """Returns OpenAI's usage object, summed over v2 usages (a legacy request's prompts)."""
    prompt = completion = cached = 0
    for item in usages:
        prompt += item.prompt_tokens
        completion += item.completion_tokens
        cached += item.cached_prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_bytes(item: inference_pb2.TokenLogprob | inference_pb2.TopLogprob) -> list[int]:
    # token_bytes are exact where token shows part of a character as U+FFFD
    # (OpenAI's `bytes` exist so that clients can join such tokens). An answer
    # cached before they existed has none: its text's UTF-8, as then.
    return list(item.token_bytes or item.token.encode())


def _logprob(value: float) -> float:
    # json.dumps writes -inf as -Infinity, which strict JSON parsers (OpenAI's
    # SDKs among them) refuse. The sampler and logprobs keep the same tokens,
    # ties included, so a sampled token is finite; a -inf could still come of
    # a rounding hair at the nucleus edge (the two sum the mass apart) or of
    # non-finite logits. Clamped to the most negative finite float: "never".
    return value if math.isfinite(value) else -sys.float_info.max


def chat_logprobs(items: Sequence[inference_pb2.TokenLogprob]) -> Json:
    """Returns a chat choice's logprobs object (`content`: one entry per token)."""
    return {
        "content": [
            {
                "token": item.token,
                "logprob": _logprob(item.logprob),
                "bytes": _token_bytes(item),
                "top_logprobs": [
                    {
                        "token": top.token,
                        "logprob": _logprob(top.logprob),
                        "bytes": _token_bytes(top),
                    }
                    for top in item.top_logprobs
                ],
            }
            for item in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: Sequence[inference_pb2.TokenLogprob], offset: int) -> Json:
    """Returns a legacy completion's logprobs object; `offset` is the first token's text offset."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [_logprob(item.logprob) for item in items],
        "top_logprobs": [_top_with_sampled(item) for item in items],
        "text_offset": offsets,
    }


def _top_with_sampled(item: inference_pb2.TokenLogprob) -> Json:
    """Returns a legacy completion's alternatives at one position: the `logprobs` most
    likely tokens and, as OpenAI always adds it (up to logprobs+1 entries), the sampled
    one (scoring code reads `top_logprobs[i][tokens[i]]`)."""
    top = {alternative.token: _logprob(alternative.logprob) for alternative in item.top_logprobs}
    top.setdefault(item.token, _logprob(item.logprob))
    return top


class ChatShapes:
    """ChatShapes builds the objects of one chat completion (same id, created and model)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, request_id: str, created: int, model: types_pb2.ModelRef) -> None:
        self.id = f"{self.id_prefix}{request_id}"
        self.created = created
        self.model = model_id(model)
        self.fingerprint = model.version
        head = json_bytes(self._head(self.chunk_object))
        self._chunk_prefix = b"data: " + head[:-1] + b',"choices":['

    def _head(self, kind: str) -> Json:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def completion(self, choices: Sequence[inference_pb2.Choice], totals: Json) -> Json:
        """Returns the whole chat.completion object."""
        return {
            **self._head(self.object),
            "choices": [
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": choice.text, "refusal": None},
                    "logprobs": chat_logprobs(choice.logprobs) if choice.logprobs else None,
                    "finish_reason": finish_reason(choice.finish_reason),
                }
                for choice in choices
            ],
            "usage": totals,
        }

    def chunk(
        self,
        index: int,
        delta: Json,
        logprobs: Json | None,
        finish: str | None,
        with_usage: bool,
    ) -> bytes:
        """Returns the SSE event of a chat.completion.chunk of one choice (`usage: null`
        when usage comes last). The head, the same in every chunk, is serialised once."""
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        tail = b'],"usage":null}\n\n' if with_usage else b"]}\n\n"
        return self._chunk_prefix + json_bytes(choice) + tail

    def usage_chunk(self, totals: Json) -> Json:
        """Returns the last chunk of a stream that asked for usage: no choices."""
        return {**self._head(self.chunk_object), "choices": [], "usage": totals}


class CompletionShapes(ChatShapes):
    """CompletionShapes builds a legacy completion's objects (text_completion)."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def text_choice(self, index: int, text: str, logprobs: Json | None, finish: str | None) -> Json:
        """Returns one legacy choice."""
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def text_completion(self, choices: Sequence[Json], totals: Json | None) -> Json:
        """Returns a text_completion object (a stream's chunks have no usage)."""
        result = {**self._head(self.object), "choices": list(choices)}
        if totals is not None:
            result["usage"] = totals
        return result


def chat_completion(response: pb.CompleteResponse, created: int) -> Json:
    """Returns the chat.completion object of one v2 CompleteResponse."""
    chat = ChatShapes(response.request_id, created, response.model)
    return chat.completion(response.choices, usage([response.usage]))


def text_completion(
    responses: Sequence[pb.CompleteResponse], n: int, logprobs: bool, created: int
) -> Json:
    """Returns the text_completion object of a legacy completion's v2 responses (one per
    prompt, each with `n` choices; choice i of prompt p is choice p * n + i)."""
    first = responses[0]
    shaper = CompletionShapes(first.request_id, created, first.model)
    choices = [
        shaper.text_choice(
            p * n + choice.index,
            choice.text,
            completion_logprobs(choice.logprobs, 0) if logprobs else None,
            finish_reason(choice.finish_reason),
        )
        for p, response in enumerate(responses)
        for choice in response.choices
    ]
    return shaper.text_completion(choices, usage(r.usage for r in responses))


def embeddings(response: pb.EmbedResponse, base64_encoded: bool) -> Json:
    """Returns OpenAI's embeddings list from a v2 EmbedResponse."""
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": item.index,
                "embedding": base64.b64encode(item.base64).decode()
                if base64_encoded
                else list(item.values),
            }
            for item in response.embeddings
        ],
        "model": model_id(response.model),
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "total_tokens": response.usage.prompt_tokens,
        },
    }


def model(model_id_: str, created: int) -> Json:
    """Returns an OpenAI model object."""
    return {"id": model_id_, "object": "model", "created": created, "owned_by": OWNER}


def model_list(ids: Iterable[str], created: int) -> Json:
    """Returns OpenAI's model list."""
    return {"object": "list", "data": [model(i, created) for i in ids]}


def error(message: str, kind: str, param: str | None, code: str | None) -> Json:
    """Returns OpenAI's error object (`error` first, as clients read it)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
