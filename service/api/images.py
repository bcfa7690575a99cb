"""Loading request images safely: data URLs, local files under an allowed folder, optional remote URLs.

Every source is size-checked before decoding, and the pixel count is read from the header before the
pixels are decoded, so decompression bombs are refused cheaply. Remote URLs are off by default; when on, the host
is resolved once, every address must be global (``ipaddress``'s ``is_global``, and so must the IPv4 address that an
IPv4-mapped, 6to4, Teredo or NAT64 address carries), and the connection goes to the address that was checked (no
second resolution: DNS rebinding cannot turn it into loopback). One deadline bounds the whole fetch, and every
failure of a remote image gets the same message, so that the server is no port scanner.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from seeright.service.requests import RequestError
from seeright.service.settings import Settings


def decode_image(data: bytes, field: str, settings: Settings, reserve: Callable[[int], None] | None = None) -> Image.Image:
    """Decode bytes into an RGB image, refusing oversized or undecodable input; ``reserve`` is told the decoded
    size (from the header) before any pixel is decoded, and may refuse it."""
    if len(data) > settings.max_image_bytes:
        raise RequestError(field, f"image is {len(data)} bytes; the limit is {settings.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            if width * height > settings.max_image_pixels:
                raise RequestError(field, f"image is {width}x{height} pixels; the limit is {settings.max_image_pixels}")
            if reserve is not None:
                reserve(width * height * 3)
            probe.load()
            return probe.convert("RGB")
    except RequestError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise RequestError(field, f"not a decodable image ({type(exc).__name__})") from exc


def _data_url(url: str, field: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise RequestError(field, "data URLs must look like data:image/png;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(field, "invalid base64 payload") from exc


def _local_file(url: str, field: str, settings: Settings) -> bytes:
    if settings.allowed_image_dir is None:
        raise RequestError(field, "local image paths are disabled on this server")
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    if "\x00" in raw:
        raise RequestError(field, "not a valid path (NUL byte)")
    root = settings.allowed_image_dir.resolve()
    try:
        path = (root / raw).resolve() if not Path(raw).is_absolute() else Path(raw).resolve()
        if not path.is_relative_to(root):  # resolve() follows symlinks, so links out of the folder are refused too
            raise RequestError(field, "path is outside the allowed image folder")
        if not path.is_file():
            raise RequestError(field, "no such image file")
        if path.stat().st_size > settings.max_image_bytes:
            raise RequestError(field, f"image file exceeds {settings.max_image_bytes} bytes")
        return path.read_bytes()
    except (OSError, ValueError) as exc:  # a name too long, a folder without permission, ...
        raise RequestError(field, f"cannot read this path ({type(exc).__name__})") from exc


REMOTE_FAILED = "could not load an image from this URL"
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is globally reachable, and so is any IPv4 address it carries (IPv4-mapped, 6to4, Teredo,
    NAT64): such an address routes to its IPv4 address, which may be loopback or a cloud's metadata service."""
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        carried = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if carried is None and ip in NAT64:
            carried = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if carried is not None:
            return public_address(carried)
    return True


def _checked_address(host: str, port: int) -> str:
    """The one address of ``host`` to connect to, every address it resolves to being public."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(public_address(ip) for ip in addresses):
        raise ValueError("a non-public address")
    return str(addresses[0])


def _remote(url: str, field: str, settings: Settings, reserve: Callable[[int], None] | None) -> Image.Image:
    """The image behind an http(s) URL, fetched from the address that was checked, within one deadline."""
    if not settings.allow_remote_urls:
        raise RequestError(field, "remote image URLs are disabled on this server")
    deadline = time.monotonic() + settings.remote_timeout_s
    try:
        parsed = urlparse(url)
        host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
        ip = _checked_address(host, port)
        pinned = parsed._replace(netloc=f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}").geturl()
        headers = {"Host": parsed.netloc.rpartition("@")[2]}
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        with httpx.Client(timeout=settings.remote_timeout_s, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
            response = client.send(request, stream=True)
            try:
                response.raise_for_status()
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > settings.max_image_bytes or time.monotonic() > deadline:
                        raise ValueError("too large or too slow")
                    chunks.append(chunk)
            finally:
                response.close()
        data = b"".join(chunks)
    except (httpx.HTTPError, OSError, ValueError, UnicodeError) as exc:
        raise RequestError(field, REMOTE_FAILED) from exc
    try:
        return decode_image(data, field, settings, reserve)
    except RequestError as exc:  # a non-image answer says no more than a refused connection
        raise RequestError(field, REMOTE_FAILED) from exc


def load_image(url: str, field: str, settings: Settings, reserve: Callable[[int], None] | None = None) -> Image.Image:
    """The image behind an ``image_url.url`` value (``reserve``: see :func:`decode_image`)."""
    if url.startswith(("http://", "https://")):
        return _remote(url, field, settings, reserve)
    if url.startswith("data:"):
        data = _data_url(url, field)
    elif url.startswith("file://") or "://" not in url:
        data = _local_file(url, field, settings)
    else:
        raise RequestError(field, "unsupported URL scheme")
    return decode_image(data, field, settings, reserve)
