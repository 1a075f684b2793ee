"""Kernel command line, SideroLinkConfig documents, and which source wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatekeeper.config.cmdline import (
    cmdline_values,
    read_cmdline,
    siderolink_api_from_cmdline,
    split_cmdline,
)
from gatekeeper.config.documents import load_documents, parse_documents
from gatekeeper.config.errors import ConfigError
from gatekeeper.config.resolve import resolve_config

# --- kernel command line -------------------------------------------------------------


def test_first_siderolink_api_wins() -> None:
    text = "console=ttyS0 siderolink.api=grpc://a:1 siderolink.api=grpc://b:2 quiet"
    assert siderolink_api_from_cmdline(text) == "grpc://a:1"


def test_no_siderolink_api() -> None:
    assert siderolink_api_from_cmdline("console=ttyS0 siderolink.apix=1 quiet") is None
    assert siderolink_api_from_cmdline("siderolink.api") is None  # no "=": no value
    assert siderolink_api_from_cmdline("") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('siderolink.api="https://a:1?jointoken=x y"', "https://a:1?jointoken=x y"),
        ('"siderolink.api=https://a:1?x=y z"', "https://a:1?x=y z"),
        ("siderolink.api=a=b", "a=b"),
        ('siderolink.api=a"b', 'a"b'),
        ("siderolink.api=", ""),
        ("\tsiderolink.api=x\n", "x"),
    ],
)
def test_kernel_quoting(text: str, expected: str) -> None:
    assert siderolink_api_from_cmdline(text) == expected


def test_arguments_after_double_dash_belong_to_init() -> None:
    assert siderolink_api_from_cmdline("quiet -- siderolink.api=grpc://a:1") is None


def test_split_and_values() -> None:
    text = 'a b=1 "c=2 3" talos.logging.kernel=tcp://x:1 talos.logging.kernel=udp://y:2'
    assert split_cmdline(text) == [
        ("a", None),
        ("b", "1"),
        ("c", "2 3"),
        ("talos.logging.kernel", "tcp://x:1"),
        ("talos.logging.kernel", "udp://y:2"),
    ]
    assert cmdline_values(text, "talos.logging.kernel") == ["tcp://x:1", "udp://y:2"]
    assert cmdline_values(text, "a") == []


def test_read_cmdline(tmp_path: Path) -> None:
    path = tmp_path / "cmdline"
    path.write_bytes(b"siderolink.api=grpc://a:1 \xff\n")
    assert read_cmdline(path) == "siderolink.api=grpc://a:1 \ufffd"
    with pytest.raises(ConfigError, match=r"^.*/missing: cannot read: No such file or directory$"):
        read_cmdline(tmp_path / "missing")


def test_read_real_proc_cmdline() -> None:
    assert isinstance(read_cmdline(), str)


# --- documents -----------------------------------------------------------------------

SIDEROLINK_DOC = """\
apiVersion: v1alpha1
kind: SideroLinkConfig
apiUrl: https://siderolink.example/?jointoken=secret
uniqueToken: optional-string
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_load_siderolink_document(tmp_path: Path) -> None:
    path = _write(tmp_path, SIDEROLINK_DOC)
    cfg = load_documents(path)
    assert cfg is not None
    assert cfg.api.target() == "siderolink.example:443"
    assert cfg.api.tls and cfg.api.join_token == "secret"
    assert cfg.unique_token == "optional-string"
    assert cfg.source == f"{path} document 1"


def test_other_kinds_are_ignored_and_indexes_count_every_document(tmp_path: Path) -> None:
    text = (
        "apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: block\n"
        "---\n"
        "---\napiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: x\n"
        "---\n" + SIDEROLINK_DOC
    )
    path = _write(tmp_path, text)
    cfg = load_documents(path)
    assert cfg is not None and cfg.source == f"{path} document 4"
    docs = parse_documents(text, "f")
    assert [(i, d["kind"]) for i, d in docs] == [
        (1, "NetworkDefaultActionConfig"),
        (3, "NetworkRuleConfig"),
        (4, "SideroLinkConfig"),
    ]


def test_file_without_siderolink_document(tmp_path: Path) -> None:
    path = _write(tmp_path, "apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: x\n")
    assert load_documents(path) is None
    assert load_documents(_write(tmp_path, "")) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\n",
            "document 1 (SideroLinkConfig): apiUrl is required",
        ),
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: ''\n",
            "document 1 (SideroLinkConfig): apiUrl is required",
        ),
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: http://a?jointoken=s3cr3t\n",
            "document 1 (SideroLinkConfig): apiUrl scheme must be https:// or grpc://",
        ),
        (
            "kind: X\n---\napiVersion: v1alpha1\nkind: SideroLinkConfig\n"
            "apiUrl: https://a/join?jointoken=s3cr3t\n",
            "document 1 (X): apiVersion is required",
        ),
        (
            "apiVersion: v1alpha1\nkind: X\n---\napiVersion: v1alpha1\nkind: SideroLinkConfig\n"
            "apiUrl: https://a/join?jointoken=s3cr3t\n",
            "document 2 (SideroLinkConfig): apiUrl path must be empty",
        ),
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: 12\n",
            "document 1 (SideroLinkConfig): apiUrl must be a string",
        ),
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: grpc://a:1\nuniqueToken: 5\n",
            "document 1 (SideroLinkConfig): uniqueToken must be a string",
        ),
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: grpc://a:1\napiURL: x\n",
            "document 1 (SideroLinkConfig): unknown field apiURL",
        ),
        (
            SIDEROLINK_DOC + "---\n" + SIDEROLINK_DOC,
            "document 2 (SideroLinkConfig): "
            "only one SideroLinkConfig is allowed (the first is document 1)",
        ),
        ("apiVersion: v1alpha1\n", "document 1: kind is required"),
        ("apiVersion: v1alpha1\nkind: [a]\n", "document 1: kind must be a string"),
        (
            "apiVersion: v1alpha2\nkind: SideroLinkConfig\n",
            "document 1 (SideroLinkConfig): apiVersion must be v1alpha1",
        ),
        ("- a\n- b\n", "document 1: document must be a mapping with apiVersion and kind"),
        ("just text\n", "document 1: document must be a mapping with apiVersion and kind"),
        ("{1: 2, kind: x}\n", "document 1: field name 1 is not a string"),
        (
            "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: grpc://a:1\napiUrl: grpc://b:1\n",
            "document 1: invalid YAML at line 4, column 1: duplicate key apiUrl",
        ),
        (
            "apiVersion: v1alpha1\nkind: X\n---\napiUrl: [unclosed\n",
            # The rest is the YAML parser's own wording (libyaml's or PyYAML's).
            "document 2: invalid YAML at line 5, column 1: ",
        ),
        ("a: !!python/object:os.system x\n", "document 1: invalid YAML"),
        ("a: 2020-99-99\n", "document 1: "),
    ],
)
def test_document_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_documents(path)
    text_err = str(info.value)
    assert text_err.startswith(f"{path} {message}"), text_err
    assert "\n" not in text_err
    assert "s3cr3t" not in text_err


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read: No such file or directory$"):
        load_documents(tmp_path / "nope.yaml")
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"kind: \xff\n")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not valid UTF-8 \(byte offset 6\)$"):
        load_documents(path)


def test_yaml_errors_do_not_quote_input(tmp_path: Path) -> None:
    text = "apiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: 'https://a?jointoken=s3cr3t\n"
    with pytest.raises(ConfigError) as info:
        load_documents(_write(tmp_path, text))
    assert "s3cr3t" not in str(info.value)


# --- resolve -------------------------------------------------------------------------


def _cmdline(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cmdline"
    path.write_text(text + "\n")
    return path


def test_document_wins_over_kernel_argument(tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "siderolink.api=grpc://kernel:1")
    cfg = resolve_config(cmdline, _write(tmp_path, SIDEROLINK_DOC))
    assert cfg is not None and cfg.api.host == "siderolink.example"


def test_document_wins_even_over_a_broken_kernel_argument(tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "siderolink.api=grpc://[broken")
    cfg = resolve_config(cmdline, _write(tmp_path, SIDEROLINK_DOC))
    assert cfg is not None and cfg.api.host == "siderolink.example"


def test_kernel_argument_when_no_document(tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "quiet siderolink.api=10.5.0.2:3445?jointoken=t&grpc_tunnel=y")
    other = _write(tmp_path, "apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: x\n")
    for config_path in (None, other, tmp_path / "absent.yaml"):
        cfg = resolve_config(cmdline, config_path)
        assert cfg is not None
        assert cfg.api.target() == "10.5.0.2:3445"
        assert cfg.api.join_token == "t" and cfg.api.grpc_tunnel and not cfg.api.tls
        assert cfg.unique_token is None
        assert cfg.source == f"kernel command line {cmdline}"


def test_nothing_configured(tmp_path: Path) -> None:
    assert resolve_config(_cmdline(tmp_path, "quiet"), None) is None
    assert resolve_config(None, None) is None
    assert resolve_config(None, tmp_path / "absent.yaml") is None


@pytest.mark.parametrize("value", ["siderolink.api=", 'siderolink.api=""', "siderolink.api= "])
def test_present_but_empty_argument_is_an_error_not_a_removal(tmp_path: Path, value: str) -> None:
    # An empty value is a mistake: taken as "not configured", it would tear the link down
    # and move the maintenance API to every address.
    cmdline = _cmdline(tmp_path, f"quiet {value} x=1")
    with pytest.raises(ConfigError) as info:
        resolve_config(cmdline, None)
    assert str(info.value) == (
        f"kernel command line {cmdline}: siderolink.api is present but empty: give the "
        "SideroLink API URL, or remove the parameter"
    )


def test_a_bare_argument_without_value_is_an_error(tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "quiet siderolink.api x=1")
    with pytest.raises(ConfigError) as info:
        resolve_config(cmdline, None)
    assert "siderolink.api has no value" in str(info.value)


def test_bad_kernel_argument_names_its_source(tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "siderolink.api=grpc://fd00::1:3445?jointoken=s3cr3t")
    with pytest.raises(ConfigError) as info:
        resolve_config(cmdline, None)
    assert str(info.value) == (
        f"kernel command line {cmdline} (siderolink.api): "
        "apiUrl IPv6 host must be in brackets, e.g. grpc://[fd00::1]:3445"
    )


def test_broken_document_is_an_error_even_with_kernel_argument(tmp_path: Path) -> None:
    cmdline = _cmdline(tmp_path, "siderolink.api=grpc://kernel:1")
    with pytest.raises(ConfigError, match="document 1: kind is required"):
        resolve_config(cmdline, _write(tmp_path, "apiVersion: v1alpha1\n"))


# --- bounds: sizes and alias expansion (README "Limits") ---------------------------------


def _big_file(path: Path, head: str, filler_bytes: int) -> Path:
    with path.open("w") as f:
        f.write(head)
        f.write("# " + "x" * filler_bytes + "\n")
    return path


def test_a_20_mb_config_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _big_file(tmp_path / "config.yaml", SIDEROLINK_DOC, 20 * 1024 * 1024)
    with pytest.raises(ConfigError) as info:
        load_documents(path)
    assert str(info.value) == f"{path}: file is larger than 1024 KiB"
    # The case: a 20 MB uniqueToken cannot get past the file bound either.
    path.write_text(SIDEROLINK_DOC.replace("optional-string", "u" * (20 * 1024 * 1024)))
    with pytest.raises(ConfigError) as info:
        resolve_config(None, path)
    assert str(info.value) == f"{path}: file is larger than 1024 KiB"


def test_an_alias_bomb_in_a_siderolink_document_is_refused(tmp_path: Path) -> None:
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    levels += [f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in pairs]
    text = (
        "apiVersion: v1alpha1\nkind: SideroLinkConfig\n"
        + "".join(f"x{i}: {level}\n" for i, level in enumerate(levels))
        + "apiUrl: *i\n"
    )
    with pytest.raises(ConfigError) as info:
        load_documents(_write(tmp_path, text))
    assert str(info.value) == (
        f"{tmp_path / 'config.yaml'} document 1: invalid YAML: aliases expand to more than "
        "1,000,000 nodes (an alias bomb?)"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("uniqueToken", "u" * (512 * 1024), "uniqueToken is longer than 1024 bytes"),
        ("uniqueToken", "u" * 1025, "uniqueToken is longer than 1024 bytes"),
        ("uniqueToken", "é" * 513, "uniqueToken is longer than 1024 bytes"),  # 1026 bytes
        ("apiUrl", "https://a.example/?jointoken=" + "t" * 1025, "apiUrl jointoken is longer"),
        ("apiUrl", "https://a.example/?x=" + "y" * 4096, "apiUrl is longer than 4096 bytes"),
    ],
)
def test_oversized_tokens_and_urls_name_the_field_and_limit(
    tmp_path: Path, field: str, value: str, message: str
) -> None:
    doc = {"apiUrl": "https://a.example/?jointoken=secret", "uniqueToken": "u"}
    doc[field] = value
    text = "apiVersion: v1alpha1\nkind: SideroLinkConfig\n" + "".join(
        f"{key}: '{text}'\n" for key, text in doc.items()
    )
    with pytest.raises(ConfigError) as info:
        load_documents(_write(tmp_path, text))
    error = str(info.value)
    assert error.startswith(f"{tmp_path / 'config.yaml'} document 1 (SideroLinkConfig): {message}")
    assert "\n" not in error and len(error) < 200
    assert "uuu" not in error and "ttt" not in error and "yyy" not in error


def test_tokens_at_the_limit_are_accepted(tmp_path: Path) -> None:
    text = (
        "apiVersion: v1alpha1\nkind: SideroLinkConfig\n"
        f"apiUrl: 'https://a.example/?jointoken={'t' * 1024}'\nuniqueToken: '{'u' * 1024}'\n"
    )
    cfg = load_documents(_write(tmp_path, text))
    assert cfg is not None and cfg.unique_token == "u" * 1024
    assert cfg.api.join_token == "t" * 1024


def test_oversized_kernel_argument_and_command_line(tmp_path: Path) -> None:
    long_token = "t" * 2000
    path = _cmdline(tmp_path, f"siderolink.api=grpc://[fd00::1]:8090?jointoken={long_token}")
    with pytest.raises(ConfigError) as info:
        resolve_config(path, None)
    assert str(info.value) == (
        f"kernel command line {path} (siderolink.api): apiUrl jointoken is longer than 1024 bytes"
    )
    huge = _big_file(tmp_path / "huge-cmdline", "siderolink.api=grpc://a:1 ", 20 * 1024 * 1024)
    with pytest.raises(ConfigError) as info:
        read_cmdline(huge)
    assert str(info.value) == f"{huge}: larger than 64 KiB, not a kernel command line"
