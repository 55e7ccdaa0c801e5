"""bench.edge_split's arithmetic: medians per process and what each left-out group saves."""

from __future__ import annotations

import pytest

from bench.edge_split import medians, print_table


def test_medians_take_each_process_over_rounds_and_drop_idle_ones():
    rounds = [{"edge-full": 1000.0, "idle": 5.0}, {"edge-full": 1200.0}, {"edge-full": 900.0}]
    assert medians(rounds) == {"edge-full": 1000}


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
