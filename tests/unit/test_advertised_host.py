"""A worker registers the address the edge reaches it at: as set, or its own on the route
to the router (`auto`: replicas of one compose service each register their own)."""

from __future__ import annotations

from services.inference.service import advertised_host


def test_a_set_host_is_registered_as_it_is():
    assert advertised_host("10.1.2.3", "router:50051") == "10.1.2.3"
    assert advertised_host("inference", "router:50051") == "inference"


def test_auto_is_this_worker_s_address_on_the_route_to_the_router():
    assert advertised_host("auto", "127.0.0.1:50051") == "127.0.0.1"
    assert advertised_host("auto", "localhost:50051") in {"127.0.0.1", "::1"}
    assert advertised_host("auto", "[::1]:50051") == "::1"
