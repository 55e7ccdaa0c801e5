"""The browser playground through the real edge.

The edge serves the page itself, with no credential and a self-only CSP; a
real headless Chromium (Debian's, driven by Playwright) loads it, pastes a
key, picks demo-lm and streams a completion, and the text must grow while
the stream runs. The screenshot is kept under build/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from gateway import static_site
from services.launcher.mesh import Mesh, MeshConfig
from tests.conftest import TEST_SERVICE_ENV
from tests.e2e.conftest import wait_for_healthy_hosts
from tests.e2e.test_auth import create_key
from tokenmesh.inference.v1 import inference_service_pb2 as v1
from tokenmesh.inference.v1 import inference_service_pb2_grpc as v1_rpc

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "artifacts"
PROMPT = "And God said"
MAX_OUTPUT_TOKENS = 160
# The page's run state: idle, streaming, then done, error or stopped.
STATE = "document.querySelector('#status').dataset.state"
# The first choice's streamed text, and the run state, read in one go.
TEXT_AND_STATE = f"() => [document.querySelector('.choice-text')?.textContent.length ?? 0, {STATE}]"
ENDED = f"() => !['idle', 'streaming'].includes({STATE})"
# deterministic-test (20 ms a step here) runs to max_output_tokens: a run of this many
# tokens streams for seconds, long enough to click around in, fail or cut it.
TEST_MODEL = "deterministic-test"
LONG_RUN_TOKENS = 480
# What the page says of a choice whose stream ended before its final message.
NO_FINAL_MESSAGE = "ended without a final message"


def chromium_path() -> str:
    """Returns Debian's Chromium; fails (never skips) when it is missing."""
    path = (
        os.environ.get("TOKENMESH_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        pytest.fail(
            "headless Chromium is missing: `make browser` installs Debian's chromium "
            "(apt-get install chromium), or set TOKENMESH_CHROMIUM",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # Playwright's own browser downloads are never used: Debian's Chromium.
        browser = playwright.chromium.launch(executable_path=chromium_path())
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def limited_key(mesh) -> str:
    """A key with a request limit, so the edge sends x-ratelimit-* headers."""
    return str(create_key(mesh, "--rpm", "600")["secret"])


def test_static_files_are_public_with_a_self_only_csp(mesh):
    for junk in ({}, {"authorization": "Bearer not-a-jwt"}, {"x-api-key": "tm_wrong"}):
        reply = httpx.get(f"{mesh.edge_url}/playground", headers=junk, timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        csp = reply.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert reply.headers["x-content-type-options"] == "nosniff"
    # Every resource the page loads comes from the edge itself (no CDN).
    resources = re.findall(r'(?:src|href)="([^"]+)"', reply.text)
    assert resources and all(r.startswith(("/playground/", "data:")) for r in resources), resources
    for path, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        served = httpx.get(f"{mesh.edge_url}/playground/{path}", timeout=10)
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
        assert served.text == (static_site.PLAYGROUND_DIR / path).read_text()
    # Only the static files are public: the API behind the edge still needs a key.
    assert httpx.get(f"{mesh.edge_url}/v2/models", timeout=10).status_code == 401


def _sample_text(page: Page, longer_than: int) -> tuple[int, str]:
    """Waits until the text is longer than `longer_than` or the run ended; returns
    (length, run state) as the page had them at that moment."""
    handle = page.wait_for_function(
        f"""() => {{
          const [n, s] = ({TEXT_AND_STATE})();
          return (n > {longer_than} || !['idle', 'streaming'].includes(s)) && [n, s];
        }}""",
        polling=10,
        timeout=60_000,
    )
    length, state = handle.json_value()
    return int(length), str(state)


def _pairs(page: Page, list_id: str) -> dict[str, str]:
    return dict(
        page.evaluate(
            f"""() => [...document.querySelectorAll('#{list_id} dt')]
                .map((dt) => [dt.textContent, dt.nextElementSibling.textContent])"""
        )
    )


def _start_streaming(page: Page, edge_url: str, key: str) -> None:
    page.goto(f"{edge_url}/playground")
    page.fill("#api-key", key)
    page.click("#load-models")
    page.wait_for_selector("#model option[value='demo-lm']", state="attached")
    page.select_option("#model", "demo-lm")
    page.select_option("#version", "1")
    page.fill("#prompt", PROMPT)
    page.fill("#max-output-tokens", str(MAX_OUTPUT_TOKENS))
    page.fill("#temperature", "0.8")
    page.fill("#seed", "7")
    page.check("#logprobs")
    page.fill("#top-logprobs", "3")
    page.click("#generate")


def test_browser_streams_a_completion_with_usage_and_a_logprob_heat_map(
    mesh, browser: Browser, limited_key: str
):
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))

    _start_streaming(page, mesh.edge_url, limited_key)
    samples = [_sample_text(page, 0)]
    for _ in range(2):
        samples.append(_sample_text(page, samples[-1][0]))
    page.wait_for_function(f"() => {STATE} !== 'streaming'", timeout=60_000)
    final_length, state = page.evaluate(TEXT_AND_STATE)
    screenshot = _save_screenshot(page)

    assert state == "done", page.inner_text("#status") + page.inner_text("#error")
    # The text grew while the stream ran: part of it was on the page while the
    # run was still streaming (a page that waited for the whole body shows all
    # of the text at once, after the stream ended). Later samples may find the
    # run done already: a busy machine can pause the browser's polling longer
    # than the rest of the stream takes.
    lengths = [length for length, _ in samples]
    assert lengths == sorted(lengths) and lengths[-1] <= final_length, samples
    assert samples[0][1] == "streaming" and 0 < samples[0][0] < final_length, samples

    usage = _pairs(page, "usage")
    completion = int(usage["completion_tokens"])
    assert 0 < completion <= MAX_OUTPUT_TOKENS
    assert int(usage["total_tokens"]) == int(usage["prompt_tokens"]) + completion
    assert usage["served by"] == "demo-lm@1"
    assert "first token (client)" in _pairs(page, "timing")
    headers = _pairs(page, "headers")
    assert headers["HTTP status"] == "200"
    assert headers["x-ratelimit-limit"].startswith("600")
    assert int(headers["x-ratelimit-remaining"]) < 600

    # One heat-map cell per generated token, each coloured by its probability.
    cells = page.eval_on_selector_all(
        "#heatmap .tok",
        "cells => cells.map((c) => [Number(c.dataset.p), c.style.backgroundColor, c.title])",
    )
    assert len(cells) == completion
    assert all(
        0 < p <= 1 and colour.startswith("rgb(") and "p=" in title for p, colour, title in cells
    )
    assert len({colour for _, colour, _ in cells}) > 1  # probabilities differ, so do colours

    _assert_curl_matches_the_request(page.inner_text("#curl"), mesh.edge_url, limited_key)
    # The key stayed in this tab and went nowhere but the edge.
    assert page.evaluate("sessionStorage.getItem('tokenmesh.playground.key')") == limited_key
    assert page.evaluate("localStorage.length") == 0
    assert requests and all(url.startswith(f"{mesh.edge_url}/") for url in requests), requests
    assert not problems, problems  # no CSP violation, no script error
    print(f"playground screenshot: {screenshot}")


def _assert_curl_matches_the_request(curl: str, edge_url: str, key: str) -> None:
    assert curl.startswith(f"curl -N {edge_url}/v2/models/demo-lm:generate")
    assert '"x-api-key: $TOKENMESH_API_KEY"' in curl and key not in curl
    body: dict[str, Any] = json.loads(curl.split("-d '", 1)[1].rstrip("'"))
    assert body == {
        "version": "1",
        "prompt": PROMPT,
        "sampling": {"temperature": 0.8, "seed": "7"},
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        "logprobs": True,
        "top_logprobs": 3,
    }


def test_browser_streams_a_chat_with_two_choices(mesh, browser: Browser, limited_key: str):
    page = browser.new_page()
    page.goto(f"{mesh.edge_url}/playground")
    page.fill("#api-key", limited_key)
    page.click("#load-models")
    page.wait_for_selector("#model option[value='demo-lm']", state="attached")
    page.select_option("#model", "demo-lm")
    page.check("#mode-chat")
    page.fill("#n", "2")
    page.fill("#max-output-tokens", "12")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_function(f"() => !['idle', 'streaming'].includes({STATE})", timeout=60_000)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#error")
    texts = page.eval_on_selector_all(".choice-text", "nodes => nodes.map((n) => n.textContent)")
    assert len(texts) == 2 and all(texts), texts
    finishes = page.eval_on_selector_all(
        "#choice-table tbody tr", "rows => rows.map((r) => r.cells[1].textContent)"
    )
    assert len(finishes) == 2 and all(f in ("stop", "length") for f in finishes), finishes
    assert page.locator("#heatmap .tok").count() == 0  # no logprobs asked for
    body = json.loads(page.inner_text("#curl").split("-d '", 1)[1].rstrip("'"))
    assert [m["role"] for m in body["messages"]] == ["system", "user"] and body["n"] == 2
    assert "prompt" not in body


def test_browser_shows_the_edges_error_for_a_bad_key(mesh, browser: Browser):
    page = browser.new_page()
    page.goto(f"{mesh.edge_url}/playground")
    page.fill("#api-key", "tm_" + "x" * 43)
    page.click("#load-models")
    page.wait_for_function(
        "() => document.querySelector('#models-status').textContent.includes('401')"
    )
    assert page.is_disabled("#generate")


def _start_long_run(page: Page, edge_url: str, key: str, n: int = 1) -> None:
    """Streams a long deterministic-test run; returns once its first text is on the page."""
    page.goto(f"{edge_url}/playground")
    page.fill("#api-key", key)
    page.click("#load-models")
    page.wait_for_selector(f"#model option[value='{TEST_MODEL}']", state="attached")
    page.select_option("#model", TEST_MODEL)
    page.fill("#prompt", "count")
    page.fill("#n", str(n))
    page.fill("#max-output-tokens", str(LONG_RUN_TOKENS))
    page.click("#generate")
    length, state = _sample_text(page, 0)
    assert state == "streaming" and length > 0, (length, state, page.inner_text("#status"))


def _column(page: Page, cell: int) -> list[str]:
    """A column of the per-choice table (1: finish)."""
    return list(
        page.eval_on_selector_all(
            "#choice-table tbody tr", f"rows => rows.map((r) => r.cells[{cell}].textContent)"
        )
    )


def _finish_labels(page: Page) -> list[str]:
    return list(page.eval_on_selector_all(".choice .finish", "s => s.map((x) => x.textContent)"))


def test_a_run_keeps_its_stop_button_and_the_page_whatever_else_is_clicked(
    mesh, browser: Browser, limited_key: str
):
    """Loading models during a run re-enabled Generate; a second run then lost its Stop
    (the first run's clean-up turned it off) and showed the first run's table."""
    page = browser.new_page()
    _start_long_run(page, mesh.edge_url, limited_key)
    with page.expect_response(lambda r: "/v2/models?" in r.url):
        page.click("#load-models")
    page.wait_for_function(
        "() => document.querySelector('#models-status').textContent.includes('generative')"
    )
    assert page.evaluate(STATE) == "streaming"
    assert page.is_disabled("#generate") and page.is_enabled("#stop")

    # A run replaced anyway (the form submitted by script): the replaced run's
    # clean-up leaves the new run's Stop, status and table alone.
    page.evaluate("document.querySelector('#generate-form').requestSubmit()")
    page.wait_for_function(
        f"""() => {STATE} === 'streaming'
          && /Streaming… [1-9]/.test(document.querySelector('#status').textContent)""",
        timeout=60_000,
    )
    assert page.is_enabled("#stop") and page.is_disabled("#generate")
    assert _column(page, 1) == []  # the replaced run wrote no summary of its own
    assert _finish_labels(page) == ["streaming…"]

    page.click("#stop")
    page.wait_for_function(ENDED, timeout=60_000)
    assert page.evaluate(STATE) == "stopped", page.inner_text("#status")
    assert _finish_labels(page) == ["· stopped"] and _column(page, 1) == ["stopped"]
    assert page.is_enabled("#generate") and page.is_disabled("#stop")


@pytest.fixture
def lone_worker_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own with one worker serving deterministic-test only: its tests
    unload the version or kill the worker."""
    config = MeshConfig(
        state_dir=Path(tmp_path_factory.mktemp("playground-failures")),
        redis_url=None,
        workers=1,
        envoy_concurrency=1,
        health_check_interval_s=0.5,
        edge_tls_port=None,
        service_env={
            **TEST_SERVICE_ENV,
            "TOKENMESH_TEST_MODELS": f"{TEST_MODEL}:1",
            "TOKENMESH_MODELS": "",
            # An unload fails the running streams after 1 s of grace.
            "TOKENMESH_GRACE_SECONDS": "1",
        },
    )
    with Mesh(config) as mesh:
        wait_for_healthy_hosts(mesh, [f"model:{TEST_MODEL}:1"], 1)
        yield mesh


def test_a_stream_that_fails_after_it_started_shows_each_choice_failed(
    lone_worker_mesh: Mesh, browser: Browser
):
    """Each running choice gets a final message with `error` (the stream's status is in
    trailers, which fetch() cannot read): the page said "Done" for such a run."""
    page = browser.new_page()
    _start_long_run(page, lone_worker_mesh.edge_url, lone_worker_mesh.dev_api_key(), n=2)
    with lone_worker_mesh.channel("inference-0") as channel:
        v1_rpc.InferenceAdminServiceStub(channel).UnloadModel(
            v1.UnloadModelRequest(model=TEST_MODEL, version="1"), timeout=30
        )
    page.wait_for_function(ENDED, timeout=60_000)
    status = page.inner_text("#status")
    assert page.evaluate(STATE) == "error", status
    assert status.startswith("Failed:") and "UNAVAILABLE" in status, status
    assert _finish_labels(page) == ["· error (UNAVAILABLE)"] * 2
    assert _column(page, 1) == ["error", "error"]
    errors = page.inner_text("#error").splitlines()
    assert len(errors) == 2 and all("model version unloaded" in e for e in errors), errors


def test_a_stream_cut_by_a_killed_worker_shows_its_choice_ended_without_a_final_message(
    lone_worker_mesh: Mesh, browser: Browser
):
    """The worker dies mid-stream: the body ends without its last chunk and no final
    message came. The page said only "network error", the choice still "streaming…"."""
    page = browser.new_page()
    _start_long_run(page, lone_worker_mesh.edge_url, lone_worker_mesh.dev_api_key())
    lone_worker_mesh.kill("inference-0")  # this test's own mesh's worker
    page.wait_for_function(ENDED, timeout=60_000)
    status = page.inner_text("#status")
    assert page.evaluate(STATE) == "error", status
    assert f"{NO_FINAL_MESSAGE} for choice(s) 0" in status, status
    assert _finish_labels(page) == [f"· {NO_FINAL_MESSAGE}"]
    assert _column(page, 1) == [NO_FINAL_MESSAGE]
    assert "incomplete" in page.inner_text("#error")


def _save_screenshot(page: Page) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "playground.png"
    page.screenshot(path=str(path), full_page=True)
    return path
