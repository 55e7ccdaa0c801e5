"""Which windows a limited inference call counts in (services/inference/request_limits.py)."""

from __future__ import annotations

from gateway import model_routing
from services.core import contract
from services.inference import request_limits

HEADERS = {
    contract.KEY_ID_HEADER: "key_a",
    contract.TENANT_HEADER: "acme",
    model_routing.MODEL_HEADER: "demo-lm",
}


def test_a_model_lookup_counts_in_the_keys_windows_not_the_models():
    # OpenAI's GET /models/{id} is routed by its model since lookups resolve aliases;
    # counted in the model's window, a client polling models.retrieve used up the
    # model's requests per minute for everyone.
    lookup = request_limits.method_kind("/tokenmesh.openai.v1.OpenAIService/GetModel")
    chat = request_limits.method_kind("/tokenmesh.openai.v1.OpenAIService/CreateChatCompletion")
    complete = request_limits.method_kind("/tokenmesh.inference.v2.InferenceService/Complete")
    assert (lookup.openai, lookup.model_window) == (True, False)
    assert (chat.openai, chat.model_window) == (True, True)
    assert (complete.openai, complete.model_window) == (False, True)
    assert request_limits.descriptor(HEADERS, lookup.model_window) == (
        ("key_id", "key_a"),
        ("tenant", "acme"),
    )
    assert ("model", "demo-lm") in (request_limits.descriptor(HEADERS, chat.model_window) or ())
