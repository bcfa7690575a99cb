"""Loading request images safely: data URLs, local files under an allowed folder, optional remote URLs.

Every source is size-checked before decoding, and the pixel count is read from the header before the
pixels are decoded, so decompression bombs are refused cheaply. Remote URLs are off by default; when on,
hosts that resolve to loopback, private, link-local or reserved addresses are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from seeright.service.requests import RequestError
from seeright.service.settings import Settings


def decode_image(data: bytes, field: str, settings: Settings) -> Image.Image:
    """Decode bytes into an RGB image, refusing oversized or undecodable input."""
    if len(data) > settings.max_image_bytes:
        raise RequestError(field, f"image is {len(data)} bytes; the limit is {settings.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            if width * height > settings.max_image_pixels:
                raise RequestError(field, f"image is {width}x{height} pixels; the limit is {settings.max_image_pixels}")
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
    root = settings.allowed_image_dir.resolve()
    path = (root / raw).resolve() if not Path(raw).is_absolute() else Path(raw).resolve()
    if not path.is_relative_to(root):  # resolve() follows symlinks, so links out of the folder are refused too
        raise RequestError(field, "path is outside the allowed image folder")
    if not path.is_file():
        raise RequestError(field, "no such image file")
    if path.stat().st_size > settings.max_image_bytes:
        raise RequestError(field, f"image file exceeds {settings.max_image_bytes} bytes")
    return path.read_bytes()


def _public_host(host: str, field: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise RequestError(field, f"cannot resolve host {host!r}") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
            raise RequestError(field, f"host {host!r} resolves to a non-public address")


def _remote(url: str, field: str, settings: Settings) -> bytes:
    if not settings.allow_remote_urls:
        raise RequestError(field, "remote image URLs are disabled on this server")
    host = urlparse(url).hostname or ""
    _public_host(host, field)
    try:
        with httpx.stream("GET", url, timeout=settings.remote_timeout_s, follow_redirects=False) as resp:
            resp.raise_for_status()
            chunks, total = [], 0
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > settings.max_image_bytes:
                    raise RequestError(field, f"image exceeds {settings.max_image_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise RequestError(field, f"could not fetch the image ({type(exc).__name__})") from exc
    return b"".join(chunks)


def load_image(url: str, field: str, settings: Settings) -> Image.Image:
    """The image behind an ``image_url.url`` value."""
    if url.startswith("data:"):
        data = _data_url(url, field)
    elif url.startswith(("http://", "https://")):
        data = _remote(url, field, settings)
    elif url.startswith("file://") or "://" not in url:
        data = _local_file(url, field, settings)
    else:
        raise RequestError(field, "unsupported URL scheme")
    return decode_image(data, field, settings)
