"""The SideroLink API URL rules (docs/compatibility.md) and secret hygiene of the parsed objects."""

from __future__ import annotations

import pytest

from gatekeeper.config.errors import ConfigError
from gatekeeper.config.siderolink import ApiEndpoint, SideroLinkConfig, parse_api_url

W = "test"


def test_no_scheme_means_plaintext_grpc() -> None:
    api = parse_api_url("10.5.0.2:3445?jointoken=ttt", W)
    assert api == ApiEndpoint(host="10.5.0.2", port=3445, tls=False, join_token="ttt")
    assert api.target() == "10.5.0.2:3445"


def test_grpc_scheme_is_plaintext() -> None:
    api = parse_api_url("grpc://10.5.0.2:3445?jointoken=ttt", W)
    assert (api.host, api.port, api.tls, api.join_token) == ("10.5.0.2", 3445, False, "ttt")


@pytest.mark.parametrize("scheme", ["https", "HTTPS", "tls", "anything"])
def test_every_other_scheme_is_tls(scheme: str) -> None:
    assert parse_api_url(f"{scheme}://api.example:8099", W).tls is True


def test_https_without_port_gets_443() -> None:
    api = parse_api_url("https://10.5.0.2?jointoken=ttt&jointoken=xxx", W)
    assert api.target() == "10.5.0.2:443"
    assert api.join_token == "ttt"  # the first jointoken value


def test_grpc_without_port_gets_443_too() -> None:
    assert parse_api_url("grpc://api.example", W).target() == "api.example:443"
    assert parse_api_url("api.example", W).target() == "api.example:443"


def test_empty_port_means_default() -> None:
    assert parse_api_url("grpc://api.example:", W).port == 443


def test_no_join_token() -> None:
    assert parse_api_url("grpc://10.5.0.2:3445", W).join_token is None
    # Talos sends no token for an empty value either.
    assert parse_api_url("grpc://10.5.0.2:3445?jointoken=", W).join_token is None


def test_join_token_is_percent_decoded() -> None:
    assert parse_api_url("grpc://h:1?jointoken=a%2Bb%3D", W).join_token == "a+b="


@pytest.mark.parametrize(
    ("query", "tunnel"),
    [
        ("grpc_tunnel=true", True),
        ("grpc_tunnel=y", True),
        ("grpc_tunnel=false", False),
        ("grpc_tunnel=TRUE", False),
        ("grpc_tunnel=1", False),
        ("grpc_tunnel=y&grpc_tunnel=false", True),
        ("grpc_tunnel=false&grpc_tunnel=y", False),
        ("", False),
    ],
)
def test_grpc_tunnel_hint(query: str, tunnel: bool) -> None:
    assert parse_api_url(f"https://api.example?{query}", W).grpc_tunnel is tunnel


def test_ipv6_host_in_brackets() -> None:
    api = parse_api_url("grpc://[FD00:0::1]:3445", W)
    assert api.host == "fd00::1"
    assert api.target() == "[fd00::1]:3445"
    assert parse_api_url("https://[fd00::1]", W).target() == "[fd00::1]:443"
    assert parse_api_url("[fd00::1]:50001", W).target() == "[fd00::1]:50001"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "apiUrl is required"),
        ("grpc://fd00::1:3445", "apiUrl IPv6 host must be in brackets, e.g. grpc://[fd00::1]:3445"),
        ("fd00::1", "apiUrl IPv6 host must be in brackets, e.g. grpc://[fd00::1]:3445"),
        ("grpc://[fd00::1", "apiUrl host is not valid"),
        ("grpc://[nonsense]:1", "apiUrl host is not valid"),
        ("grpc://[fe80::1%25eth0]:1", "apiUrl IPv6 host must not have a zone"),
        ("grpc://:3445", "apiUrl host is missing"),
        ("https://?jointoken=x", "apiUrl host is missing"),
        ("grpc://h:0", "apiUrl port must be a number from 1 to 65535"),
        ("grpc://h:65536", "apiUrl port must be a number from 1 to 65535"),
        ("grpc://h:http", "apiUrl port must be a number from 1 to 65535"),
        ("grpc://h_st:-1", "apiUrl port must be a number from 1 to 65535"),
        ("grpc://user:pw@h:1", "apiUrl must not contain a user name or password"),
        ("grpc://h st:1", "apiUrl must not contain whitespace or control characters"),
        ("grpc://h:1?jointoken=a\nb", "apiUrl must not contain whitespace or control characters"),
        ("grpc://ex%41mple:1", "apiUrl host is not a valid host name or address"),
        ("grpc://bad..name:1", "apiUrl host is not a valid host name or address"),
        ("grpc://-bad:1", "apiUrl host is not a valid host name or address"),
        ("grpc://exämple:1", "apiUrl host is not a valid host name or address"),
    ],
)
def test_invalid_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_api_url(url, "kernel command line /proc/cmdline (siderolink.api)")
    assert info.value.message == message
    assert str(info.value) == f"kernel command line /proc/cmdline (siderolink.api): {message}"


def test_kernel_argument_ignores_path_but_document_rejects_it() -> None:
    assert parse_api_url("https://api.example/some/path", W).host == "api.example"
    assert parse_api_url("https://api.example/", W, document=True).host == "api.example"
    with pytest.raises(ConfigError, match=r"^d: apiUrl path must be empty$"):
        parse_api_url("https://api.example/join?jointoken=x", "d", document=True)


@pytest.mark.parametrize("url", ["http://api.example", "10.5.0.2:3445", "tls://x:1"])
def test_document_accepts_only_https_and_grpc(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^d: apiUrl scheme must be https:// or grpc://$"):
        parse_api_url(url, "d", document=True)


def test_scheme_is_looked_for_only_at_the_start() -> None:
    # Talos would see "x://" inside the query as a scheme and skip the grpc:// default.
    api = parse_api_url("api.example:3445?next=x://y", W)
    assert (api.host, api.port, api.tls) == ("api.example", 3445, False)


def test_redacted_url_and_repr_hide_the_join_token() -> None:
    api = parse_api_url("https://api.example:8099/?jointoken=s3cr3t&grpc_tunnel=y", W)
    assert api.redacted_url() == "https://api.example:8099?jointoken=<redacted>&grpc_tunnel=true"
    assert str(api) == api.redacted_url()
    for text in (repr(api), str(api), f"{api}", api.redacted_url()):
        assert "s3cr3t" not in text
    cfg = SideroLinkConfig(api=api, unique_token="un1que", source="x")
    assert "s3cr3t" not in repr(cfg) and "un1que" not in repr(cfg)
    assert "s3cr3t" not in str(cfg) and "un1que" not in str(cfg)


def test_the_admin_url_carries_the_token_url_encoded() -> None:
    api = parse_api_url("grpc://[fd00::1]:8090?jointoken=a%2Bb%26c&grpc_tunnel=true", W)
    assert api.url() == "grpc://[fd00::1]:8090?jointoken=a%2Bb%26c&grpc_tunnel=true"
    assert parse_api_url(api.url(), W) == api


def test_redacted_url_without_token() -> None:
    api = parse_api_url("grpc://[fd00::1]:3445", W)
    assert api.redacted_url() == "grpc://[fd00::1]:3445"


def test_error_where_is_kept_on_one_line() -> None:
    err = ConfigError("apiUrl is required", "/tmp/odd\nname.yaml document 1 (SideroLinkConfig)")
    assert str(err) == "/tmp/odd\\nname.yaml document 1 (SideroLinkConfig): apiUrl is required"
    assert isinstance(err, ValueError)
