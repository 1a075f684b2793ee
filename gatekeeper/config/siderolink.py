"""The SideroLink API URL (``siderolink.api=`` / ``apiUrl``) and what it means for the machine.

Rules, matching how Talos reads the same value:

- No scheme at all (``10.5.0.2:3445?jointoken=x``) means ``grpc://``.
- ``grpc://`` is plaintext gRPC; every other scheme means TLS with the system
  roots. Documents are stricter and accept only ``https://`` and ``grpc://``
  with an empty path (``""`` or ``/``); the kernel argument takes any scheme
  and ignores a path, as Talos does.
- The join token is the first ``jointoken`` query value; an empty one counts
  as no token (Talos then sends none).
- ``grpc_tunnel=true`` or ``grpc_tunnel=y`` (exactly) asks for the tunnel.

Where Talos is loose we choose and say so:

- A missing port is 443 for every scheme. Talos adds ``:443`` for ``https``
  only and hands other bare hosts to gRPC, whose resolver then uses 443 too;
  we make that explicit so ``target()`` always has a port.
- Talos finds a scheme by ``[a-zA-z]+://`` anywhere in the text (so a ``://``
  inside the query counts); we only look at the start of the text.
- IPv6 hosts must be in brackets (``grpc://[fd00::1]:3445``). Talos would
  accept ``fd00::1:3445`` as a host and fail when dialling; we reject it.
- User info (``user:pass@``), whitespace, control characters, zone ids and
  invalid host names are rejected instead of being passed on to the dialer.

Sizes are checked here, before anything is sent: the URL is at most 4 KiB (the longest
host name is 253 bytes, so that leaves room for a long query), the join token and the unique
token at most 1 KiB each (Talos's unique token is 32 characters, real join tokens are under
100). Go gRPC servers take requests up to 4 MiB and ours up to 64 KiB; a 20 MB token would
only be refused by the server, again at every retry.

Error messages are fixed sentences that never quote the URL, so tokens stay
out of logs.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlsplit

from gatekeeper.config.errors import ConfigError

DEFAULT_PORT = 443
JOIN_TOKEN_PARAM = "jointoken"
TUNNEL_PARAM = "grpc_tunnel"
_TUNNEL_YES = frozenset({"true", "y"})
REDACTED = "<redacted>"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")
_DOCUMENT_SCHEMES = frozenset({"https", "grpc"})

MAX_URL_BYTES = 4096
MAX_TOKEN_BYTES = 1024

MSG_REQUIRED = "apiUrl is required"
MSG_SCHEME = "apiUrl scheme must be https:// or grpc://"
MSG_PATH = "apiUrl path must be empty"


@dataclass(frozen=True)
class ApiEndpoint:
    """Where and how to reach the SideroLink API. The join token never shows in repr/str."""

    host: str  # a DNS name or an IP address, IPv6 without brackets
    port: int
    tls: bool
    join_token: str | None = field(default=None, repr=False)
    grpc_tunnel: bool = False

    def target(self) -> str:
        """``host:port`` for a gRPC channel, IPv6 in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def redacted_url(self) -> str:
        """A canonical URL for logs and status output, with the join token replaced."""
        return self._url(REDACTED)

    def url(self) -> str:
        """The canonical URL with the join token: only for admins of the maintenance API."""
        return self._url(quote(self.join_token or "", safe=""))

    def _url(self, token: str) -> str:
        scheme = "https" if self.tls else "grpc"
        params = []
        if self.join_token is not None:
            params.append(f"{JOIN_TOKEN_PARAM}={token}")
        if self.grpc_tunnel:
            params.append(f"{TUNNEL_PARAM}=true")
        query = "?" + "&".join(params) if params else ""
        return f"{scheme}://{self.target()}{query}"

    def __str__(self) -> str:
        return self.redacted_url()


@dataclass(frozen=True)
class SideroLinkConfig:
    """The machine's SideroLink settings and where they came from."""

    api: ApiEndpoint
    unique_token: str | None = field(default=None, repr=False)
    # e.g. "kernel command line /proc/cmdline" or "/etc/gatekeeper/config.yaml document 1"
    source: str = ""


def parse_api_url(url: str, where: str, *, document: bool = False) -> ApiEndpoint:
    """Parse a SideroLink API URL; ``where`` names its origin in errors.

    ``document=True`` adds the SideroLinkConfig document rules (scheme https or
    grpc, empty path). Raises ConfigError.
    """
    if not isinstance(url, str):
        raise ConfigError("apiUrl must be a string", where)
    if url == "":
        raise ConfigError(MSG_REQUIRED, where)
    # Before anything else walks the text: a limit check costs nothing, a 20 MB scan does.
    if len(url) > MAX_URL_BYTES or len(url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        raise ConfigError(f"apiUrl is longer than {MAX_URL_BYTES} bytes", where)
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ConfigError("apiUrl must not contain whitespace or control characters", where)

    match = _SCHEME.match(url)
    if match is None:
        if document:
            raise ConfigError(MSG_SCHEME, where)
        scheme, rest = "grpc", url
    else:
        scheme, rest = match.group(1).lower(), url[match.end() :]
    if document and scheme not in _DOCUMENT_SCHEMES:
        raise ConfigError(MSG_SCHEME, where)

    try:
        parts = urlsplit("grpc://" + rest)
    except ValueError:
        raise ConfigError("apiUrl host is not valid", where) from None
    if document and parts.path not in ("", "/"):
        raise ConfigError(MSG_PATH, where)
    if "@" in parts.netloc:
        raise ConfigError("apiUrl must not contain a user name or password", where)

    host = _parse_host(parts.netloc, where)
    port = _parse_port(parts.netloc, where)
    params = parse_qsl(parts.query, keep_blank_values=True)
    token = next((value for key, value in params if key == JOIN_TOKEN_PARAM), None)
    check_token_size("apiUrl jointoken", token, where)
    tunnel = next((value for key, value in params if key == TUNNEL_PARAM), None)
    return ApiEndpoint(
        host=host,
        port=port,
        tls=scheme != "grpc",
        join_token=token or None,
        grpc_tunnel=tunnel in _TUNNEL_YES,
    )


def check_token_size(name: str, value: str | None, where: str) -> None:
    """ConfigError naming the field and the limit (never the value) when a token is too long."""
    if value is not None and (
        len(value) > MAX_TOKEN_BYTES
        or len(value.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES
    ):
        raise ConfigError(f"{name} is longer than {MAX_TOKEN_BYTES} bytes", where)


def _split_netloc(netloc: str, where: str) -> tuple[str, str | None]:
    """(host text, port text or None); host keeps no brackets."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise ConfigError("apiUrl host is not valid", where)
        host, after = netloc[1:end], netloc[end + 1 :]
        if after == "":
            return host, None
        if not after.startswith(":"):
            raise ConfigError("apiUrl host is not valid", where)
        return host, after[1:]
    if "]" in netloc:
        raise ConfigError("apiUrl host is not valid", where)
    if netloc.count(":") > 1:
        raise ConfigError("apiUrl IPv6 host must be in brackets, e.g. grpc://[fd00::1]:3445", where)
    host, sep, port = netloc.partition(":")
    return host, (port if sep else None)


def _parse_host(netloc: str, where: str) -> str:
    bracketed = netloc.startswith("[")
    host, _port = _split_netloc(netloc, where)
    if host == "":
        raise ConfigError("apiUrl host is missing", where)
    if bracketed:
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError("apiUrl host is not a valid IPv6 address", where) from None
        if addr.scope_id is not None:
            raise ConfigError("apiUrl IPv6 host must not have a zone", where)
        return str(addr)
    if not _valid_hostname(host):
        raise ConfigError("apiUrl host is not a valid host name or address", where)
    return host.lower()


def _valid_hostname(host: str) -> bool:
    if not all(ch in string.ascii_letters + string.digits + "-._" for ch in host):
        return False
    if len(host) > 253:
        return False
    labels = host.removesuffix(".").split(".")
    return all(len(label) <= 63 and _HOST_LABEL.match(label) for label in labels)


def _parse_port(netloc: str, where: str) -> int:
    _host, port_text = _split_netloc(netloc, where)
    if port_text is None or port_text == "":
        # "host:" with an empty port means the default, as in Go's url package.
        return DEFAULT_PORT
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ConfigError("apiUrl port must be a number from 1 to 65535", where)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError("apiUrl port must be a number from 1 to 65535", where)
    return port
