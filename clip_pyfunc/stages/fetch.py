"""Image URLs, fetched so that a request cannot turn the server against its own network (SSRF).

The one module that opens sockets. `decode.fetch_urls` calls it for cells that hold a URL;
everything here is off unless the model_config sets `allow_urls: true`. When on, each fetch:

- takes `https` only (`http` too with `allow_http`), and never a URL with credentials in it;
- resolves the host and refuses it when any address is not globally routable (loopback,
  private, link-local such as the 169.254.169.254 metadata service, multicast, reserved,
  unspecified, shared), unless the host is listed in `url_allow_private`;
- connects to the very address it checked (TLS still verifies the host name), so a second DNS
  answer cannot swap it, and no proxy from the environment is used;
- follows at most `url_max_redirects` redirects, checking every hop the same way;
- has a connect timeout and a read timeout that bounds the whole download, streams the body
  and stops at `max_image_bytes`, and wants an `image/*` content type;
- sends no cookies or credentials, and a User-Agent that names the package.

Failures are InvalidInput (without a row; the caller adds it), so one bad URL spoils only its row.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import quote, urljoin, urlsplit

from clip_pyfunc.errors import InvalidInput, preview

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class UrlPolicy:
    """What a URL fetch may do (built from the model_config by `url_policy`).

    Attributes:
        allow_http: Also fetch plain-http URLs (https only otherwise).
        allow_private: Host names (as written in URLs) exempt from the address check, for
            in-house image stores.
        connect_timeout: Seconds to open the connection.
        read_timeout: Seconds for the whole answer, headers and body, per hop.
        max_redirects: Redirects followed per URL.
        max_bytes: Most bytes of one image body.
        concurrency: Fetches in flight at once per request.
        user_agent: The User-Agent header.
    """

    allow_http: bool = False
    allow_private: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    max_redirects: int = 3
    max_bytes: int = 20 * 1024 * 1024
    concurrency: int = 8
    user_agent: str = "clip-pyfunc"


def url_policy(config) -> UrlPolicy | None:
    """The image-URL fetch policy a model_config (settings.RuntimeConfig) asks for, or None when URLs are off."""
    if not config.allow_urls:
        return None
    from clip_pyfunc import __version__

    return UrlPolicy(allow_http=config.allow_http, allow_private=config.url_allow_private,
                     connect_timeout=float(config.url_connect_timeout), read_timeout=float(config.url_read_timeout),
                     max_redirects=config.url_max_redirects, max_bytes=config.max_image_bytes,
                     concurrency=config.url_concurrency, user_agent=f"clip-pyfunc/{__version__}")


def is_url(value: object) -> bool:
    """True for a string that is meant as a URL (`scheme://...`); base64 never holds ':'."""
    if not isinstance(value, str):
        return False
    head = value[:16].lstrip().lower()
    return "://" in head and head.split("://", 1)[0].isalpha()


def fetch_many(urls: Sequence[str], policy: UrlPolicy) -> list[bytes | InvalidInput]:
    """Fetch every URL, at most `policy.concurrency` at once; one bytes or InvalidInput each."""
    if len(urls) <= 1:
        return [_fetch_or_error(u, policy) for u in urls]
    with ThreadPoolExecutor(max_workers=min(policy.concurrency, len(urls)), thread_name_prefix="clip-fetch") as pool:
        return list(pool.map(lambda u: _fetch_or_error(u, policy), urls))


def _fetch_or_error(url: str, policy: UrlPolicy) -> bytes | InvalidInput:
    try:
        return fetch(url, policy)
    except InvalidInput as e:
        return e


def fetch(url: str, policy: UrlPolicy) -> bytes:
    """Fetch one image URL under `policy`, following checked redirects.

    Raises:
        InvalidInput: Refused scheme or address, too many redirects, timeout, an HTTP error
            status, a body over the byte limit, or a content type that is not an image.
    """
    current = url.strip()
    deadline = time.monotonic() + policy.connect_timeout + policy.read_timeout  # for the URL, all hops
    for hop in range(policy.max_redirects + 1):
        status, headers, body = _get(current, policy, deadline)
        if status in _REDIRECTS:
            location = headers.get("location")
            if not location:
                raise InvalidInput(f"URL {preview(current, 80)} answered {status} without a Location")
            current = urljoin(current, location)
            continue
        return body
    raise InvalidInput(f"URL {preview(url, 80)} redirected more than {policy.max_redirects} times (url_max_redirects)")


def _get(url: str, policy: UrlPolicy, deadline: float) -> tuple[int, dict[str, str], bytes]:
    """One checked GET: (status, lower-cased headers, body; empty for a redirect)."""
    parts = _check_url(url, policy)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(host, port, policy)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")  # a non-ASCII path is sent percent-encoded
    if parts.query:
        path += "?" + quote(parts.query, safe="=&%:@!$'()*+,;/?~")
    conn = _connection(parts.scheme, host, port, address, policy)
    # A server that trickles the handshake or the headers would reset each read's timeout:
    # at the deadline the socket is shut, whatever is being read.
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(conn,))
    timer.daemon = True
    timer.start()
    try:
        conn.request("GET", path, headers={"User-Agent": policy.user_agent, "Accept": "image/*",
                                           "Accept-Encoding": "identity", "Connection": "close"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status in _REDIRECTS:
            return response.status, headers, b""
        if response.status != 200:
            raise InvalidInput(f"URL {preview(url, 80)} answered HTTP {response.status} {response.reason}")
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.startswith("image/"):
            raise InvalidInput(f"URL {preview(url, 80)} is not an image: content type {kind or 'missing'!r}")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_bytes:
            raise InvalidInput(f"URL {preview(url, 80)} is {length} bytes, over the limit of "
                               f"{policy.max_bytes} bytes (max_image_bytes)")
        return response.status, headers, _read_body(response, url, policy, deadline)
    except (socket.timeout, OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, socket.timeout) or time.monotonic() >= deadline:
            raise InvalidInput(f"URL {preview(url, 80)} timed out (url_connect_timeout {policy.connect_timeout}s, "
                               f"url_read_timeout {policy.read_timeout}s)") from e
        raise InvalidInput(f"URL {preview(url, 80)} could not be fetched ({type(e).__name__}: {e})") from e
    finally:
        timer.cancel()
        conn.close()


def _shut(conn) -> None:
    """Cut a connection at its deadline (any blocked read then fails at once)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(response, url: str, policy: UrlPolicy, deadline: float) -> bytes:
    """Stream the body, stopping at the byte limit and at the deadline (a trickling server)."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise InvalidInput(f"URL {preview(url, 80)} timed out (url_connect_timeout {policy.connect_timeout}s, "
                               f"url_read_timeout {policy.read_timeout}s)")
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise InvalidInput(f"URL {preview(url, 80)} sent over {policy.max_bytes} bytes (max_image_bytes)")
        chunks.append(chunk)


def _check_url(url: str, policy: UrlPolicy):
    """Split the URL and refuse schemes and shapes that are not allowed."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise InvalidInput(f"malformed URL {preview(url, 80)}: {e}") from e
    allowed = ("https", "http") if policy.allow_http else ("https",)
    if parts.scheme not in allowed:
        hint = "; set allow_http: true in the model_config for plain http" if parts.scheme == "http" else ""
        raise InvalidInput(f"URL scheme {parts.scheme!r} is not allowed ({preview(url, 80)}); allowed: "
                           f"{list(allowed)}{hint}")
    if not parts.hostname:
        raise InvalidInput(f"URL {preview(url, 80)} has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(f"URL {preview(url, 80)} carries credentials; they are never sent")
    return parts


def _checked_address(host: str, port: int, policy: UrlPolicy) -> str:
    """Resolve `host` and return the address to connect to; refuse non-public ones unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidInput(f"URL host {host!r} could not be resolved ({e})") from e
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise InvalidInput(f"URL host {host!r} has no address")
    if host.lower() not in {h.lower() for h in policy.allow_private}:
        for text in addresses:
            reason = refused_address(text)
            if reason:
                raise InvalidInput(f"URL host {host!r} resolves to {text}, a {reason} address; refused "
                                   "(list the host in url_allow_private to allow an in-house image store)")
    return addresses[0]


def refused_address(text: str) -> str | None:
    """Why an address may not be fetched from (e.g. 'loopback'), or None for a public one."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):  # IPv4 inside IPv6 (mapped, 6to4, Teredo) is checked as IPv4
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            reason = refused_address(str(inner))
            if reason:
                return reason
    for reason in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{reason}"):
            return reason.replace("_", "-")
    return None if ip.is_global else "non-public"


def _connection(scheme: str, host: str, port: int, address: str, policy: UrlPolicy):
    """An HTTP(S) connection that sends Host (and TLS SNI) for `host` but connects to the checked `address`."""
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=policy.connect_timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=policy.connect_timeout)

    def pinned(_address, timeout, source_address=None):
        sock = socket.create_connection((address, port), timeout, source_address)
        sock.settimeout(policy.read_timeout)
        return sock

    conn._create_connection = pinned  # http.client's own hook for opening the socket
    return conn
