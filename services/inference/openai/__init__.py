"""tokenmesh.openai.v1: OpenAI's REST API as raw JSON bytes, served by the inference v2 code."""
