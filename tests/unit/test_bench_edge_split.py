"""bench.edge_split's table: what leaving each filter group out saves."""

from __future__ import annotations

import pytest

from bench.edge_split import print_table


def test_the_table_shows_what_leaving_a_group_out_saves(capsys: pytest.CaptureFixture[str]):
    results = {
        "full": {"rps": 100.0, "cpu_us": {"edge-full": 1100, "inference-0": 6500}},
        "no-ratelimit": {"rps": 120.0, "cpu_us": {"edge-no-ratelimit": 900, "inference-0": 6400}},
        "bare": {"rps": 130.0, "cpu_us": {"bare-envoy": 560, "inference-0": 6300}},
    }
    print_table(results)
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["full"] == ["100.0", "1100", "0", "6500"]
    assert rows["no-ratelimit"] == ["120.0", "900", "200", "6400"]
    assert rows["bare"] == ["130.0", "560", "540", "6300"]
