"""adapters.yml parsing and hook matching, without any process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapter.errors import ConfigError
from adapter.proxy.adapters_config import load_adapters_config, parse_adapters_config
from adapter.proxy.hookchain import HookChain

GOOD = """
version: 1
endpoints:
  "POST /*/containers/create":
    pre: [network, ext]
    post: [network]
adapters:
  ext: http://127.0.0.1:9/hook
"""


async def builtin(message: dict[str, object]) -> dict[str, object]:
    return message


def test_parse_and_match_versioned_and_bare_paths() -> None:
    """Names resolve built-in first; patterns match with and without an API version prefix."""
    chain = HookChain.build(parse_adapters_config(GOOD, source="a.yml"), {"network": builtin}, None)
    for path in ("/v1.41/containers/create", "/containers/create"):
        matched = chain.match("POST", path)
        assert matched is not None
        assert [(h.name, h.builtin is not None) for h in matched.pre] == [
            ("network", True), ("ext", False)]
    assert chain.match("GET", "/v1.41/containers/create") is None
    assert chain.match("POST", "/v1.41/containers/abc/start") is None


@pytest.mark.parametrize(("text", "expected"), [
    ('endpoints:\n  "POST /x": {pre: [a]}\n  "POST /x": {pre: [b]}\n', "duplicate key"),
    ('endpoints:\n  "post/x": {pre: [a]}\n', "bad endpoint pattern"),
    ('endpoints:\n  "POST /[x": {pre: [a]}\n', "bad endpoint pattern"),
    ("adapters:\n  a: ftp://x\n", "http(s) URL"),
    ("endpoints: [1]\n", "'endpoints' must be a mapping"),
    ("nonsense: 1\n", "unknown top-level"),
    ("endpoints: {\n", "line 2, column 1"),
    ("- endpoints\n- adapters\n", "expected a mapping"),
    ("just a string\n", "expected a mapping"),
    ("version: 2\n", "unsupported version 2"),
    ("version: '1'\n", "unsupported version '1'"),
    ("!!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ('endpoints:\n  "POST /x": [a]\n', "must map to 'pre' and/or 'post'"),
    ('endpoints:\n  "POST /x": {pre: [a], during: [b]}\n', "must map to 'pre' and/or 'post'"),
    ('endpoints:\n  "POST /x": {pre: a}\n', "expected a list of adapter names"),
    ('endpoints:\n  "POST /x": {pre: [5]}\n', "expected a list of adapter names"),
    ('endpoints:\n  "POST /x": {post: [""]}\n', "expected a list of adapter names"),
    ('endpoints:\n  "POST": {pre: [a]}\n', "bad endpoint pattern"),
    ('endpoints:\n  "POST /a b": {pre: [a]}\n', "bad endpoint pattern"),
    ('endpoints:\n  5: {pre: [a]}\n', "bad endpoint pattern 5"),
    ("adapters: [a, b]\n", "'adapters' must map"),
    ("adapters:\n  a: 5\n", "expected an http(s) URL, got 5"),
    ("adapters:\n  a: null\n", "expected an http(s) URL, got None"),
    ("adapters:\n  a: file:///etc/passwd\n", "http(s) URL"),
    ("adapters:\n  a: http://x\n  a: http://y\n", "duplicate key"),
    ("a: &x [1]\nb: *y\n", "found undefined alias"),
    ("endpoints:\n\t\"POST /x\": {}\n", "found character '\\t'"),
])
def test_config_errors_name_the_file(text: str, expected: str) -> None:
    """Each kind of bad adapters.yml is a ConfigError naming the file and the problem."""
    with pytest.raises(ConfigError, match=r"^a\.yml: ") as caught:
        parse_adapters_config(text, source="a.yml")
    assert expected in str(caught.value)


def test_unknown_adapter_name_is_refused_unless_skipped() -> None:
    """An unknown name stops start-up; the default config skips it instead."""
    config = parse_adapters_config('endpoints:\n  "POST /x": {pre: [ghost]}\n', source="a.yml")
    with pytest.raises(ConfigError, match="unknown adapter 'ghost'"):
        HookChain.build(config, {}, None)
    assert HookChain.build(config, {}, None, skip_unknown=True).empty


def test_unreadable_adapters_file_names_the_file(tmp_path: Path) -> None:
    """A missing file, a directory or bytes that are not UTF-8: a ConfigError naming the path."""
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"endpoints: {\xff\xfe}\n")
    for path in (tmp_path / "missing.yml", tmp_path, binary):
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: cannot read"):
            load_adapters_config(path)
