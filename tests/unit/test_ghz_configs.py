"""Every ghz config is usable as-is: its call exists and its data parses."""

from __future__ import annotations

import json

import pytest

from bench.ghz_configs import GHZ_DIR, ConfigError, load_pool, validate, validate_all
from gateway import protos
from gateway.envoy_config import TRANSCODED_SERVICES


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory):
    return protos.build_descriptor_set(tmp_path_factory.mktemp("d") / "d.pb")


def test_every_config_validates(descriptor):
    assert len(validate_all(descriptor)) == len(list(GHZ_DIR.glob("*.json")))


def test_every_public_rpc_has_a_config(descriptor):
    pool = load_pool(descriptor)
    public = {
        f"{service}.{method.name}"
        for service in TRANSCODED_SERVICES
        for method in pool.FindServiceByName(service).methods
    }
    assert public <= set(validate_all(descriptor).values())


def test_an_invalid_call_name_fails(descriptor):
    config = json.loads((GHZ_DIR / "generate.json").read_text())
    config["call"] = "tokenmesh.inference.v1.InferenceService.Generat"
    with pytest.raises(ConfigError, match="not in the descriptor set"):
        validate(config, load_pool(descriptor))


def test_data_that_does_not_fit_the_request_fails(descriptor):
    config = json.loads((GHZ_DIR / "generate.json").read_text())
    config["data"]["max_tokens"] = "many"
    with pytest.raises(ConfigError, match="does not parse"):
        validate(config, load_pool(descriptor))


def test_unbounded_load_is_refused(descriptor):
    config = json.loads((GHZ_DIR / "generate.json").read_text())
    del config["total"]
    with pytest.raises(ConfigError, match="bounded"):
        validate(config, load_pool(descriptor))
