"""How the CLI prints messages as JSON: proto field names, zero values included.

One spelling for every command's `--json`: a script that reads `keys list
--json` reads `models rollout --json` the same way (it printed camelCase,
and left out a weight of 0).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message


def as_dict(message: Message) -> dict[str, Any]:
    """Returns a message as JSON-ready data: proto field names, zero values included."""
    body: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return body
