"""The mesh's contract between the edge and the services, in one place.

Every service imports its rules from here, so two modules can never
disagree on them (tests/unit/test_contract.py checks that nobody keeps a
private copy):

- name rules: model names, versions, tenants, worker ids;
- identity headers the edge sets, and the order of the identity tuple;
- component identities (SPIFFE ids in the mTLS certificates) and which of
  them may call which RPC.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# Name rules
# ---------------------------------------------------------------------------

#: MODEL_NAME: a model (or alias) name; never "." or "..", no "/" or NUL, so
#: it is safe as one path segment of the model repository.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: MODEL_VERSION: a model version, also one safe path segment.
MODEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: TENANT: a tenant id.
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: WORKER_ID: an inference worker's id (also used in request ids).
WORKER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: REQUEST_ID: a client- or edge-supplied request id.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

MODEL_NAME_RULE = "1-128 characters of [A-Za-z0-9._-], starting with a letter or digit"
MODEL_VERSION_RULE = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"
TENANT_RULE = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"


def is_model_name(value: str) -> bool:
    """Tells whether `value` is a valid model name (safe as a path segment)."""
    return MODEL_NAME.fullmatch(value) is not None


def is_model_version(value: str) -> bool:
    """Tells whether `value` is a valid model version (safe as a path segment)."""
    return MODEL_VERSION.fullmatch(value) is not None


def is_tenant(value: str) -> bool:
    """Tells whether `value` is a valid tenant id."""
    return TENANT.fullmatch(value) is not None
