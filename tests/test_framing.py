"""HTTP framing decisions over bytes, without sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpproxy.http.framing import (
    CHUNKED,
    NO_BODY,
    TUNNEL,
    UNTIL_CLOSE,
    BodyCursor,
    ChunkedScanner,
    Framing,
    FramingError,
    parse_response_head,
    request_framing,
    response_framing,
)


def h(*pairs: str) -> list[tuple[bytes, bytes]]:
    out = []
    for pair in pairs:
        name, _, value = pair.partition(":")
        out.append((name.encode(), value.strip().encode()))
    return out


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], NO_BODY),
        (["Content-Length: 0"], NO_BODY),
        (["Content-Length: 12"], Framing("length", 12)),
        (["content-length: 12", "Content-Length: 12"], Framing("length", 12)),
        (["Content-Length: 12, 12"], Framing("length", 12)),
        (["Transfer-Encoding: chunked"], CHUNKED),
        (["Transfer-Encoding: Chunked"], CHUNKED),
    ],
)
def test_request_framing(headers: list[str], expected: Framing) -> None:
    assert request_framing(h(*headers), http10=False) == expected


@pytest.mark.parametrize(
    ("headers", "http10", "message", "status"),
    [
        (
            ["Content-Length: 5", "Transfer-Encoding: chunked"],
            False,
            "both Content-Length and Transfer-Encoding",
            400,
        ),
        (
            ["Content-Length: 5", "Content-Length: 6"],
            False,
            "conflicting Content-Length values [5, 6]",
            400,
        ),
        (["Content-Length: 5, 6"], False, "conflicting Content-Length", 400),
        (["Content-Length: -1"], False, "Content-Length '-1' is not", 400),
        (["Content-Length: 0x10"], False, "Content-Length '0x10' is not", 400),
        (["Content-Length: 1e3"], False, "is not a non-negative integer", 400),
        (["Content-Length: 9999999999999999999"], False, "is not a non-negative integer", 400),
        (["Transfer-Encoding: gzip"], False, "must end in chunked", 400),
        (["Transfer-Encoding: chunked, gzip"], False, "must be the last coding", 400),
        (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], False, "only once", 400),
        (["Transfer-Encoding: gzip, chunked"], False, "not supported, only chunked", 400),
        (["Transfer-Encoding: chunked"], True, "not allowed in an HTTP/1.0 request", 400),
    ],
)
def test_request_framing_refuses_ambiguity(
    headers: list[str], http10: bool, message: str, status: int
) -> None:
    with pytest.raises(FramingError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        request_framing(h(*headers), http10=http10)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("status", "method", "headers", "expected"),
    [
        (200, "GET", ["Content-Length: 3"], Framing("length", 3)),
        (200, "HEAD", ["Content-Length: 3"], NO_BODY),
        (204, "GET", [], NO_BODY),
        (304, "GET", ["Content-Length: 3"], NO_BODY),
        (100, "POST", [], NO_BODY),
        (101, "GET", ["Upgrade: websocket"], TUNNEL),
        (200, "CONNECT", [], TUNNEL),
        (407, "CONNECT", ["Content-Length: 0"], NO_BODY),
        (200, "GET", ["Transfer-Encoding: chunked"], CHUNKED),
        (200, "GET", ["Transfer-Encoding: gzip"], UNTIL_CLOSE),
        (200, "GET", [], UNTIL_CLOSE),
    ],
)
def test_response_framing(status: int, method: str, headers: list[str], expected: Framing) -> None:
    assert response_framing(status, method, h(*headers)) == expected


def test_response_head_parsing() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length:  15 \r\nConnection: keep-alive\r\n\r\n"
    )
    assert head.status == 200
    assert head.headers == [(b"Content-Length", b"15"), (b"Connection", b"keep-alive")]
    assert not head.closes()
    assert parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n").closes()
    assert not parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").closes()
    assert parse_response_head(b"HTTP/1.1 500 \r\nConnection: close\r\n\r\n").closes()
    assert parse_response_head(b"HTTP/1.1 204\r\n\r\n").status == 204
    with pytest.raises(FramingError, match="malformed status line 'HTTP/2 200'"):
        parse_response_head(b"HTTP/2 200\r\n\r\n")


CHUNKED_BODY = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: yes\r\n\r\n"


def test_chunked_scanner_finds_the_end_with_trailers() -> None:
    scanner = ChunkedScanner()
    assert scanner.scan(CHUNKED_BODY + b"NEXT") == len(CHUNKED_BODY)
    assert scanner.done


@given(
    st.lists(st.integers(min_value=1, max_value=len(CHUNKED_BODY) - 1), max_size=10, unique=True)
)
def test_chunked_scanner_is_independent_of_how_bytes_arrive(cuts: list[int]) -> None:
    scanner = ChunkedScanner()
    bounds = [0, *sorted(cuts), len(CHUNKED_BODY)]
    ends = [scanner.scan(CHUNKED_BODY[a:b]) for a, b in itertools.pairwise(bounds)]
    assert ends[:-1] == [-1] * (len(ends) - 1)
    assert ends[-1] == bounds[-1] - bounds[-2]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"zz\r\n", "invalid chunk size line 'zz'"),
        (b"\r\n", "invalid chunk size line ''"),
        (b"5\r\nhelloXX", "not followed by CRLF"),
        (b"5\nhello\r\n", "does not end with CRLF"),
        (b"11111111111111111\r\n", "invalid chunk size"),
        (b"0\r\nbad trailer\r\n", "malformed trailer"),
        (b"1" * 5000, "chunk size line longer than 4096"),
    ],
)
def test_chunked_scanner_refuses_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(FramingError, match=message):
        ChunkedScanner().scan(body)


def test_length_cursor_counts_across_reads() -> None:
    cursor = BodyCursor(Framing("length", 10))
    assert cursor.advance(b"0123456", 0) == -1
    assert cursor.advance(b"789NEXT", 0) == 3
    assert BodyCursor(UNTIL_CLOSE).advance(b"anything", 0) == -1
