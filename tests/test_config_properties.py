"""Property tests: the config parsers fail only with one-line ConfigErrors that hide secrets."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper.config.cmdline import siderolink_api_from_cmdline, split_cmdline
from gatekeeper.config.documents import parse_documents, siderolink_from_documents
from gatekeeper.config.errors import ConfigError
from gatekeeper.config.siderolink import SideroLinkConfig, parse_api_url

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Secrets are long and distinctive so that finding one in output is not a coincidence.
secrets = st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=30).map(
    lambda s: "SECRET" + s
)
url_chars = st.sampled_from([*":/?&=[]@%#.-_ \"'\n\tabcAZ019", "://", "jointoken=", "::"])
url_noise = st.lists(url_chars, max_size=20).map("".join)
schemes = st.sampled_from(["", "grpc://", "https://", "http://", "GRPC://", "x+y://", "://"])
hosts = st.sampled_from(
    ["", "h", "api.example", "10.5.0.2", "[fd00::1]", "fd00::1", "[fd00::1", "-x", "a..b"]
)
ports = st.sampled_from(["", ":", ":1", ":3445", ":0", ":65536", ":x", ":-1"])
paths = st.sampled_from(["", "/", "/join", "//"])


@st.composite
def urls_with_token(draw: st.DrawFn) -> tuple[str, str]:
    token = draw(secrets)
    extra = draw(url_noise)
    position = draw(st.sampled_from(["query", "first", "repeat", "path", "noise"]))
    base = draw(schemes) + draw(hosts) + draw(ports) + draw(paths)
    if position == "query":
        return f"{base}?jointoken={token}{extra}", token
    if position == "first":
        return f"{base}?jointoken={token}&grpc_tunnel=y&{extra}", token
    if position == "repeat":
        return f"{base}?jointoken=&jointoken={token}&x={extra}", token
    if position == "path":
        return f"{base}/{token}{extra}?jointoken={token}", token
    return f"{base}{extra}?a={token}", token


def _check_error(err: ConfigError, *secret_values: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text
    assert text.isprintable()
    for value in secret_values:
        assert value not in text
        assert value not in repr(err)


@SETTINGS
@given(st.text(max_size=200), st.booleans())
def test_any_text_as_url(url: str, document: bool) -> None:
    try:
        api = parse_api_url(url, "w", document=document)
    except ConfigError as err:
        _check_error(err)
    else:
        assert 1 <= api.port <= 65535
        assert api.host and not api.host.startswith("[")


@SETTINGS
@given(urls_with_token(), st.booleans())
def test_token_never_shows(case: tuple[str, str], document: bool) -> None:
    url, token = case
    try:
        api = parse_api_url(url, "kernel command line /proc/cmdline", document=document)
    except ConfigError as err:
        _check_error(err, token)
        return
    cfg = SideroLinkConfig(api=api, unique_token=token, source="x")
    for text in (repr(api), str(api), api.redacted_url(), repr(cfg), str(cfg), api.target()):
        assert token not in text


@SETTINGS
@given(st.text(max_size=300))
def test_any_cmdline(text: str) -> None:
    params = split_cmdline(text)
    value = siderolink_api_from_cmdline(text)
    assert value is None or ("siderolink.api", value) in params


@SETTINGS
@given(st.text(alphabet=string.printable, max_size=50), st.text(alphabet=' "=ab\t', max_size=20))
def test_cmdline_round_trip_of_simple_values(value: str, noise: str) -> None:
    value = "".join(ch for ch in value if ch not in string.whitespace + '"')
    text = f"{noise} siderolink.api={value} other=1"
    if '"' not in noise:
        assert siderolink_api_from_cmdline(text) == value


yaml_fragments = st.sampled_from(
    [
        "apiVersion: v1alpha1\n",
        "apiVersion: v2\n",
        "kind: SideroLinkConfig\n",
        "kind: NetworkRuleConfig\n",
        "kind: [x]\n",
        "apiUrl: https://a/?jointoken=SECRETtoken123456\n",
        "apiUrl: grpc://[fd00::1]:3445?jointoken=SECRETtoken123456\n",
        "apiUrl: 'https://a/p?jointoken=SECRETtoken123456\n",
        "apiUrl: https://a/p?jointoken=SECRETtoken123456\n",
        'apiUrl: "grpc://SECRETtoken123456::1"\n',
        "uniqueToken: SECRETunique12345678\n",
        "uniqueToken: {SECRETunique12345678: 1}\n",
        "SECRETkey1234567890: 1\n",
        "---\n",
        "- SECRETtoken123456\n",
        "[\n",
        "}\n",
        "&a x\n",
        "*a\n",
        "!!binary 'SECRETtoken123456'\n",
        "\t\n",
        "a: 2020-99-99\n",
        ": :\n",
        "'\n",
    ]
)


@SETTINGS
@given(st.lists(yaml_fragments, max_size=12).map("".join))
def test_yaml_documents_fail_only_with_config_error(text: str) -> None:
    try:
        docs = parse_documents(text, "/etc/gatekeeper/config.yaml")
        siderolink_from_documents(docs, "/etc/gatekeeper/config.yaml")
    except ConfigError as err:
        _check_error(err, "SECRETtoken123456", "SECRETunique12345678")


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text_as_yaml(text: str) -> None:
    try:
        docs = parse_documents(text, "f")
        siderolink_from_documents(docs, "f")
    except ConfigError as err:
        _check_error(err)
