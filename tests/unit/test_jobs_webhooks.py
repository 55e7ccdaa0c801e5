"""Webhook signing (checked against the standardwebhooks package) and the SSRF rules."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import pytest
import standardwebhooks

from services.jobs import signing, ssrf
from services.jobs.webhooks import DeliveryPolicy


def test_signatures_verify_with_an_independent_standard_webhooks_implementation():
    secret = signing.new_secret()
    body = b'{"type":"job.succeeded","data":{"id":"job-1"}}'
    webhook = standardwebhooks.Webhook(secret)
    # The library checks the timestamp against its clock: sign with "now".
    now = int(time.time())
    headers = signing.headers([secret], "msg-job-1", now, body)
    assert webhook.verify(body, headers)["data"]["id"] == "job-1"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        webhook.verify(body + b" ", headers)


def test_a_rotated_secret_signs_with_both_and_either_verifies():
    old, new = signing.new_secret(), signing.new_secret()
    body = b"{}"
    headers = signing.headers([new, old], "msg-x", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(body, headers)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:10.0.0.1",
        "ff02::1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1: "global" to Python 3.11's ipaddress
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "fec0::1",  # site-local (deprecated, still routed in some sites)
    ],
)
def test_private_loopback_link_local_multicast_and_metadata_addresses_are_forbidden(address):
    assert ssrf.is_forbidden(ipaddress.ip_address(address))


def test_public_addresses_are_allowed():
    assert not ssrf.is_forbidden(ipaddress.ip_address("8.8.8.8"))
    assert not ssrf.is_forbidden(ipaddress.ip_address("2606:4700:4700::1111"))
    assert not ssrf.is_forbidden(ipaddress.ip_address("2002:808:808::"))  # 6to4 of 8.8.8.8


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://8.8.8.8/hook", "https"),
        ("ftp://8.8.8.8/hook", "https"),
        ("https://user:pw@8.8.8.8/hook", "credentials"),
        ("https:///hook", "host"),
        ("https://8.8.8.8:99999/hook", "valid"),
        ("https://8.8.8.8:0/hook", "port"),  # was sent to 443
    ],
)
def test_urls_that_are_not_plain_https_are_refused(url, why):
    with pytest.raises(ssrf.RefusedUrl, match=why):
        ssrf.parse(url, allow_hosts=())


def test_an_allowed_host_may_use_http_and_a_private_address():
    target = ssrf.parse("http://127.0.0.1:8080/hook?x=1", allow_hosts=("127.0.0.1",))
    assert (target.port, target.target, target.allowed) == (8080, "/hook?x=1", True)
    assert asyncio.run(ssrf.resolve(target)) == [ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "168.63.129.16",
        "169.254.1.1",
        "fe80::1",
        "::ffff:169.254.169.254",
        "224.0.0.1",
        "0.0.0.0",
    ],
)
def test_an_allowed_host_still_never_reaches_metadata_or_link_local(address: str) -> None:
    # An allow-listed name skipped every address check: one in a zone someone else
    # controls reached the cloud's metadata endpoint (and probed any port over http).
    async def lookup(host: str, port: int, owner: str = "", timeout_s: float = 0) -> list[str]:
        return ["10.0.0.7", address]

    target = ssrf.parse("http://hooks.partner.example/hook", allow_hosts=("hooks.partner.example",))
    with pytest.raises(ssrf.RefusedUrl):
        asyncio.run(ssrf.resolve(target, 1.0, lookup))
    literal = ssrf.parse(
        f"http://[{address}]/h" if ":" in address else f"http://{address}/h", allow_hosts=(address,)
    )
    with pytest.raises(ssrf.RefusedUrl):
        asyncio.run(ssrf.resolve(literal))

    # Its private addresses stay allowed (the operator's own network).
    async def private(host: str, port: int, owner: str = "", timeout_s: float = 0) -> list[str]:
        return ["10.0.0.7"]

    assert asyncio.run(ssrf.resolve(target, 1.0, private)) == [ipaddress.ip_address("10.0.0.7")]


@pytest.mark.parametrize("char", ["\x00", "\x0b", "\x7f", "\r", "\n", "\t", " "])
def test_a_url_with_a_control_character_is_refused_when_the_job_is_made(char: str) -> None:
    # Accepted, then every attempt failed (InvalidURL) to the dead letter; CR, LF and
    # tab were dropped by urlsplit, so the URL sent was not the one stored.
    with pytest.raises(ssrf.RefusedUrl, match="control"):
        ssrf.parse(f"https://hooks.example/a{char}b", allow_hosts=())


def test_a_literal_private_address_is_refused_without_a_lookup():
    target = ssrf.parse("https://10.0.0.1/hook", allow_hosts=())
    with pytest.raises(ssrf.RefusedUrl, match="10.0.0.1"):
        asyncio.run(ssrf.resolve(target))


def test_a_name_that_resolves_to_loopback_is_refused():
    target = ssrf.parse("https://localhost/hook", allow_hosts=())
    with pytest.raises(ssrf.RefusedUrl):
        asyncio.run(ssrf.resolve(target))


def test_a_name_s_address_is_not_told_to_the_caller():
    target = ssrf.parse("https://localhost/hook", allow_hosts=())
    with pytest.raises(ssrf.RefusedUrl) as refused:
        asyncio.run(ssrf.resolve(target))
    assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)


def test_an_international_host_is_sent_in_its_ascii_form_and_a_malformed_one_refused():
    # It passed the lookup and then failed every delivery (a non-ASCII Host header),
    # raising out of the webhooks loop at each lease.
    assert ssrf.parse("https://bücher.example/hook", allow_hosts=()).host == "xn--bcher-kva.example"
    for url in ("https://a..b.example/hook", f"https://{'x' * 64}.example/hook"):
        with pytest.raises(ssrf.RefusedUrl, match="valid host"):
            ssrf.parse(url, allow_hosts=())


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://faß.de/hook", "xn--fa-hia.de"),  # IDNA 2003: fass.de, another registrant
        ("https://straße.example/hook", "xn--strae-oqa.example"),
        ("https://βόλος.gr/hook", "xn--nxasmm1c.gr"),  # final sigma kept (2003: σ)
        ("https://ΒΌΛΟΣ.gr/hook", "xn--nxasmq6b.gr"),  # a capital Σ is σ (UTS #46), not ς
        ("https://BÜCHER.example:8443/hook", "xn--bcher-kva.example"),
    ],
)
def test_an_international_host_is_converted_per_idna_2008_not_2003(url, host):
    """Python's "idna" codec (IDNA 2003) maps ß to ss and ς to σ: events for faß.de
    were resolved, vetted and sent to fass.de, with its valid certificate."""
    assert ssrf.parse(url, allow_hosts=()).host == host


def test_a_host_idna_2008_does_not_allow_is_refused():
    for url in ("https://a\u200db.example/hook", "https://x\u2488.example/hook"):
        with pytest.raises(ssrf.RefusedUrl, match="valid host"):
            ssrf.parse(url, allow_hosts=())


def test_a_name_with_a_private_address_and_a_name_with_none_are_refused_alike():
    """The two answers differed ("resolves to a private ... address" and "does not
    resolve"): any key could tell which internal names exist (search domains apply)."""

    async def lookup(host: str, port: int, owner: str = "", timeout_s: float = 0) -> list[str]:
        if host == "redis.internal.test":
            return ["10.0.0.7"]
        raise OSError(f"{host}: Name or service not known")

    async def refusal(host: str) -> str:
        target = ssrf.parse(f"https://{host}/hook", allow_hosts=())
        with pytest.raises(ssrf.RefusedUrl) as refused:
            await ssrf.resolve(target, 1.0, lookup)
        return str(refused.value).replace(host, "HOST")

    internal = asyncio.run(refusal("redis.internal.test"))
    missing = asyncio.run(refusal("nothing.internal.test"))
    assert internal == missing
    assert "10.0.0.7" not in internal


def test_the_retry_schedule_ends_in_the_dead_letter_state():
    policy = DeliveryPolicy(schedule_s=(1, 2))
    assert 0.8 <= policy.next_delay_s(1) <= 1.2
    assert 1.6 <= policy.next_delay_s(2) <= 2.4
    assert policy.next_delay_s(3) is None


def test_a_webhook_lease_outlasts_its_longest_attempt():
    # An attempt: the lookup (bounded by the timeout) and the send (by twice it). A
    # lease of exactly that let a second replica send the event while the first still
    # waited, and the first's late failure overwrite the second's success.
    from services.jobs.service import webhook_lease_s

    for timeout_s in (1.0, 10.0, 30.0):
        assert webhook_lease_s(timeout_s) >= 3 * timeout_s + 10


# A process whose webhook lookup hangs (DNS that never answers) and whose caller gave up.
_HUNG_LOOKUP = """
import asyncio, socket, threading
from services.jobs import ssrf

def never_answers(*args, **kwargs):
    threading.Event().wait()

socket.getaddrinfo = never_answers  # ssrf looks it up at each call
async def main():
    try:
        await ssrf.system_lookup("hung.example", 443, "key_1", 0.2)
    except TimeoutError:
        print("gave up", flush=True)
asyncio.run(main())
"""


def test_a_hung_lookup_does_not_hold_up_the_process_s_exit():
    """The lookup threads were a ThreadPoolExecutor's, which the interpreter joins at
    exit: a stopped jobs process waited for the system's resolver to give up (tens
    of seconds with search domains; here, never), past its grace period."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _HUNG_LOOKUP],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,  # a deadline for the exit, far past what it needs
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: the hung lookup's thread held it")
    assert (done.returncode, done.stdout) == (0, "gave up\n"), done.stderr
