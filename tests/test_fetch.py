"""Image URLs: a real HTTP server on 127.0.0.1 (tests/http_images.py), allowed only by each test's explicit settings."""

from __future__ import annotations

import time

import numpy as np
import pytest
from http_images import JPEG, serve_images

from clip_pyfunc.settings import RuntimeConfig
from clip_pyfunc.stages.decode import fetch_urls
from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.stages.fetch import UrlPolicy, fetch, is_url, refused_address, url_policy

@pytest.fixture(scope="module")
def server():
    with serve_images() as served:
        yield served


def allowed(**overrides) -> UrlPolicy:
    """The explicit test setting: URLs on, plain http on, 127.0.0.1 listed as an in-house store."""
    values = dict(allow_urls=True, allow_http=True, url_allow_private=["127.0.0.1"], url_read_timeout=1.0,
                  url_connect_timeout=1.0, max_image_bytes=1_000_000)
    values.update(overrides)
    return url_policy(RuntimeConfig.from_dict(values))


def refusal(url: str, policy: UrlPolicy) -> str:
    with pytest.raises(InvalidInput) as e:
        fetch(url, policy)
    return str(e.value)


def test_good_image_is_fetched_with_package_user_agent_and_no_credentials(server):
    base, seen = server
    seen.clear()
    assert fetch(f"{base}/cat.jpg", allowed()) == JPEG
    (path, headers), = seen
    assert path == "/cat.jpg"
    assert headers["User-Agent"].startswith("clip-pyfunc/")
    assert not {"Cookie", "Authorization"} & set(headers)


@pytest.mark.parametrize("route, reason", [
    ("/missing.jpg", "HTTP 404"),
    ("/slow.jpg", "timed out"),
    ("/trickle.jpg", "timed out"),
    ("/endless.jpg", "over 1000000 bytes"),
    ("/page.html", "not an image: content type 'text/html'"),
    ("/loop", "redirected more than 3 times"),
])
def test_bad_answers_are_named(server, route, reason):
    base, _ = server
    policy = allowed()
    started = time.perf_counter()
    assert reason in refusal(f"{base}{route}", policy)
    # One deadline (connect + read timeout, 2 s) bounds the whole answer, the trickle's 8 s included; 2 s of slack
    # for a slow stretch of a shared machine
    assert time.perf_counter() - started < policy.connect_timeout + policy.read_timeout + 2.0


def test_redirect_to_refused_address_sends_no_second_request(server):
    base, seen = server
    port = base.rsplit(":", 1)[1]
    seen.clear()
    # localhost is the same server, but not the listed host: the hop is checked again and refused.
    message = refusal(f"{base}/redirect/http%3A//localhost%3A{port}/cat.jpg", allowed())
    assert "'localhost' resolves to" in message and "loopback" in message
    assert [p for p, _ in seen] == [f"/redirect/http%3A//localhost%3A{port}/cat.jpg"]
    assert "link-local" in refusal(f"{base}/redirect/http%3A//169.254.169.254/latest/meta-data/", allowed())


def test_relative_redirect_is_followed(server):
    base, _ = server
    assert fetch(f"{base}/redirect/%2Fcat.jpg", allowed()) == JPEG


def test_non_ascii_path_is_a_row_error_not_a_crash(server):
    base, seen = server
    seen.clear()
    assert "HTTP 404" in refusal(f"{base}/café.jpg", allowed())
    assert seen[0][0] == "/caf%C3%A9.jpg"


@pytest.mark.parametrize("host, reason", [
    ("127.0.0.1", "loopback"), ("localhost", "loopback"), ("10.1.2.3", "private"),
    ("169.254.169.254", "link-local"), ("[::1]", "loopback"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("[::ffff:127.0.0.1]", "loopback"), ("100.64.0.1", "non-public"),
])
def test_non_public_addresses_are_refused_before_any_request(server, host, reason):
    base, seen = server
    port = base.rsplit(":", 1)[1]
    seen.clear()
    policy = allowed(url_allow_private=[])  # URLs on, but no host exempt
    message = refusal(f"http://{host}:{port}/cat.jpg", policy)
    assert reason in message and "url_allow_private" in message
    assert seen == []


def test_default_settings_refuse_every_url_and_send_nothing(server):
    base, seen = server
    port = base.rsplit(":", 1)[1]
    seen.clear()
    urls = [f"{base}/cat.jpg", f"http://10.0.0.7:{port}/x.jpg", "http://169.254.169.254/latest/meta-data/",
            f"https://localhost:{port}/cat.jpg"]
    out = fetch_urls(urls, url_policy(RuntimeConfig()))
    assert all(isinstance(o, InvalidInput) and "allow_urls: true" in o.reason for o in out)
    assert seen == []


def test_schemes_and_credentials(server):
    base, seen = server
    seen.clear()
    https_only = allowed(allow_http=False)
    assert "allow_http" in refusal(f"{base}/cat.jpg", https_only)
    for url in ("file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://127.0.0.1:70/"):
        assert "is not allowed" in refusal(url, allowed())
    assert "credentials" in refusal(base.replace("http://", "http://user:pw@") + "/cat.jpg", allowed())
    assert seen == []


def test_fetch_urls_keeps_other_rows_and_runs_in_parallel(server):
    base, _ = server
    values = ["not a url", f"{base}/cat.jpg", f"{base}/missing.jpg", b"raw", f"{base}/slow.jpg", f"{base}/cat.jpg"]
    started = time.perf_counter()
    out = fetch_urls(values, allowed(url_read_timeout=4.0, url_connect_timeout=1.0))
    took = time.perf_counter() - started
    assert out[0] == "not a url" and out[3] == b"raw"
    assert out[1] == JPEG and out[5] == JPEG and out[4] == JPEG
    assert isinstance(out[2], InvalidInput) and "404" in out[2].reason
    assert took < 5.5  # the 3 s answer overlapped the others


def test_is_url_and_refused_address():
    assert is_url("https://x/a.jpg") and is_url("  HTTP://x") and is_url("file:///etc/passwd")
    assert not is_url("iVBORw0KGgo=") and not is_url("data:image/png;base64,AAAA") and not is_url(b"http://x")
    assert refused_address("8.8.8.8") is None and refused_address("2606:4700::1111") is None
    assert refused_address("fe80::1%eth0") == "link-local"
    assert refused_address("2002:7f00:1::1") == "loopback" and refused_address("2002:a9fe:a9fe::") == "link-local"


def test_image_model_rows(server, tiny_checkpoint, tmp_path):
    """Through the image model: URLs embed like their bytes, bad URLs name their row, others are unaffected."""
    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint
    from clip_pyfunc.artifacts.towers import export_towers
    from clip_pyfunc.registry.lookup import local_models

    base, _ = server
    _, towers = export_towers(resolve_checkpoint(tiny_checkpoint), str(tmp_path))
    on = RuntimeConfig.from_dict({"allow_urls": True, "allow_http": True, "url_allow_private": ["127.0.0.1"],
                                  "url_read_timeout": 1.0})
    (image,) = local_models(towers, on, ("image",))
    vectors, errors = image.embed_rows([f"{base}/cat.jpg", JPEG, f"{base}/page.html", f"{base}/slow.jpg"])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    assert [(e.row, "not an image" in e.reason or "timed out" in e.reason) for e in errors] == [(2, True), (3, True)]
    (off,) = local_models(towers, None, ("image",))
    _, errors = off.embed_rows([JPEG, f"{base}/cat.jpg"])
    assert [e.row for e in errors] == [1] and "allow_urls" in errors[0].reason
