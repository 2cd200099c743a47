"""txfaas.headers: the one hop-by-hop filter, the one call-id rule, the one sub-path check."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txfaas.headers import (
    HOP_BY_HOP,
    BadPath,
    append_forwarded_for,
    check_subpath,
    connection_tokens,
    end_to_end,
    new_call_id,
    to_bytes_pairs,
    to_str_pairs,
    valid_call_id,
)

# --- end_to_end ---------------------------------------------------------------------------------

ALL_HOP_BY_HOP = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Authenticate",
    b"Proxy-Authorization",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Trailers",
    b"Transfer-Encoding",
    b"Upgrade",
]


def test_end_to_end_strips_every_hop_by_hop_header_in_any_case():
    pairs = []
    for name in ALL_HOP_BY_HOP:
        pairs += [(name, b"x"), (name.lower(), b"x"), (name.upper(), b"x")]
    pairs.append((b"Content-Type", b"text/plain"))
    assert end_to_end(pairs) == [(b"Content-Type", b"text/plain")]


def test_end_to_end_strips_headers_named_in_connection_case_insensitively():
    pairs = [
        (b"Connection", b"X-Secret, keep-alive"),
        (b"x-secret", b"1"),
        (b"X-SECRET", b"2"),
        (b"X-Kept", b"3"),
    ]
    assert end_to_end(pairs) == [(b"X-Kept", b"3")]


def test_end_to_end_honours_comma_lists_with_spaces_and_empty_items():
    pairs = [
        (b"connection", b" ,X-A ,, x-b,\tX-C  "),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"X-C", b"3"),
        (b"X-D", b"4"),
    ]
    assert end_to_end(pairs) == [(b"X-D", b"4")]


def test_end_to_end_honours_several_connection_headers_wherever_they_appear():
    pairs = [(b"X-A", b"1"), (b"Connection", b"X-A"), (b"X-B", b"2"), (b"X-C", b"3"), (b"CONNECTION", b"x-c")]
    assert end_to_end(pairs) == [(b"X-B", b"2")]


def test_end_to_end_keeps_end_to_end_headers_in_order_including_repeats():
    pairs = [
        (b"Accept", b"a"),
        (b"Set-Cookie", b"one=1"),
        (b"Upgrade", b"websocket"),
        (b"Set-Cookie", b"two=2"),
        (b"Accept-Encoding", b"gzip"),
        (b"Set-Cookie", b"three=3"),
    ]
    assert end_to_end(pairs) == [
        (b"Accept", b"a"),
        (b"Set-Cookie", b"one=1"),
        (b"Set-Cookie", b"two=2"),
        (b"Accept-Encoding", b"gzip"),
        (b"Set-Cookie", b"three=3"),
    ]


def test_end_to_end_also_drops_the_callers_own_names():
    pairs = [(b"X-Call-Id", b"spoofed"), (b"X-Kept", b"1")]
    assert end_to_end(pairs, drop=frozenset({b"x-call-id"})) == [(b"X-Kept", b"1")]


def test_end_to_end_accepts_any_iterable_such_as_a_generator():
    pairs = ((n, v) for n, v in [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"X-B", b"2")])
    assert end_to_end(pairs) == [(b"X-B", b"2")]


def test_connection_tokens_are_lower_cased_names():
    assert connection_tokens([(b"Connection", b"Keep-Alive, X-Foo")]) == {b"keep-alive", b"x-foo"}


_token = st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,8}", fullmatch=True)
_pairs = st.lists(
    st.tuples(
        st.one_of(_token, st.sampled_from(ALL_HOP_BY_HOP)),
        st.binary(max_size=8).filter(lambda v: b"," not in v),
    ),
    max_size=12,
)


@given(_pairs, st.lists(st.lists(_token, max_size=3), max_size=3))
def test_end_to_end_property_keeps_exactly_the_end_to_end_headers_in_order(pairs, connection_lists):
    pairs = list(pairs)
    for i, tokens in enumerate(connection_lists):
        pairs.insert(min(i * 3, len(pairs)), (b"Connection", b", ".join(tokens)))
    # Every header named in any Connection header, including generated ones whose value happens
    # to name a header (hypothesis may draw "connection" as a plain header name too).
    named = {
        t.strip().lower() for n, v in pairs if n.lower() == b"connection" for t in v.split(b",") if t.strip()
    }
    kept = end_to_end(pairs)
    assert all(n.lower() not in HOP_BY_HOP and n.lower() not in named for n, _ in kept)
    assert kept == [(n, v) for n, v in pairs if n.lower() not in HOP_BY_HOP | named]


# --- call ids -----------------------------------------------------------------------------------


def test_new_call_id_is_a_valid_uuid4():
    ids = [new_call_id() for _ in range(2000)]
    for call_id in ids:
        parsed = uuid.UUID(call_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == call_id  # canonical: lower-case, dashes where uuid puts them
        assert valid_call_id(call_id)
    assert len(set(ids)) == len(ids)
    # Every variant digit occurs (the two random bits of that nibble are kept).
    assert {call_id[19] for call_id in ids} == set("89ab")


def test_call_ids_read_urandom_a_block_at_a_time_and_a_forked_child_gets_fresh_bytes(monkeypatch):
    from txfaas import headers

    reads: list[int] = []
    real = os.urandom
    monkeypatch.setattr(headers.os, "urandom", lambda n: reads.append(n) or real(n))
    pool = headers._Urandom()
    monkeypatch.setattr(headers, "_urandom", pool)
    ids = [new_call_id() for _ in range(600)]  # 9,600 bytes
    assert reads == [4096, 4096, 4096] and len(set(ids)) == 600
    # In a child after fork the buffer is dropped: its next id is not the parent's next one.
    monkeypatch.setattr(headers.os, "urandom", real)
    pool.take(16)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(write, new_call_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert uuid.UUID(child).version == 4
    assert child != new_call_id()


@pytest.mark.parametrize(
    "value",
    [str(uuid.uuid4()), "a", "A" * 128, "job-42.retry_1:x@y+z=", b"0123456789abcdef"],
)
def test_valid_call_id_accepts_uuids_and_short_safe_ids(value):
    assert valid_call_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a b",
        " abc",
        "abc\r\nX-Injected: 1",
        "abc\n",
        "abc\r",
        b"abc\n",
        "A" * 129,
        "caf\u00e9",
        b"caf\xc3\xa9",
        "\u0661\u0662",
        "-leading-dash",
        ".hidden",
        "a/b",
        "a\x00",
        "a;b",
    ],
)
def test_valid_call_id_refuses_spaces_control_characters_long_and_non_ascii_ids(value):
    assert not valid_call_id(value)


@given(st.text(max_size=140))
def test_valid_call_id_accepts_only_printable_ascii_without_spaces(value):
    if valid_call_id(value):
        assert 1 <= len(value) <= 128
        assert value.isascii() and value.isprintable() and " " not in value


# --- check_subpath ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segment",
    [
        b".",
        b"..",
        b"%2e",
        b"%2e%2e",
        b"%2E%2E",
        b".%2e",
        b"%2e.",
        b"a%2Fb",
        b"%2f",
        b"a%5Cb",
        b"%5c",
        b"a\\b",
        b"%00",
        b"a%00b",
    ],
)
def test_check_subpath_refuses_dot_segments_and_encoded_separators_or_nul(segment):
    with pytest.raises(BadPath):
        check_subpath([b"ok", segment])


@pytest.mark.parametrize(
    "segments",
    [[], [b""], [b"users", b"42"], [b"a.b"], [b"...", b"..a", b".env"], [b"hello%20world"], [b"%252e%252e"]],
)
def test_check_subpath_accepts_normal_segments(segments):
    assert check_subpath(segments) is None


def test_bad_path_is_a_value_error_with_a_short_message():
    with pytest.raises(ValueError, match="not allowed"):
        check_subpath([b"%2e%2e"])


# --- forwarding and conversions -----------------------------------------------------------------


def test_append_forwarded_for_appends_the_client_to_what_it_sent():
    assert append_forwarded_for([b"203.0.113.1, 10.0.0.1", b" 198.51.100.2 "], b"192.0.2.9") == (
        b"203.0.113.1, 10.0.0.1, 198.51.100.2, 192.0.2.9"
    )


def test_append_forwarded_for_without_a_header_is_the_client_address():
    assert append_forwarded_for([], b"192.0.2.9") == b"192.0.2.9"
    assert append_forwarded_for([b"", b"  "], b"::1") == b"::1"


@given(st.lists(st.tuples(st.binary(max_size=10), st.binary(max_size=20)), max_size=6))
def test_to_str_pairs_and_to_bytes_pairs_are_lossless_inverses(pairs):
    strings = to_str_pairs(pairs)
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in strings)
    assert to_bytes_pairs(strings) == pairs
