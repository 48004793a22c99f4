"""SSE frames as the SDK parses them, and splitting process output into lines."""

from __future__ import annotations

import json

from opensandbox.adapters.converter.command_execution import decode_sse_event_data

from opensandbox_platform.execd import sse


def frames(raw: bytes) -> list[dict[str, object]]:
    assert raw.endswith(b"\n\n")
    return [json.loads(f.removeprefix(b"data: ")) for f in raw.split(b"\n\n") if f]


def test_event_has_type_and_timestamp_and_omits_empty_fields() -> None:
    [payload] = frames(sse.event("init", text="abc", timestamp=5))
    assert payload == {"type": "init", "text": "abc", "timestamp": 5}
    [err] = frames(sse.event("error", error=sse.error_value("CommandExecError", "3", ["exit status 3"])))
    assert err["error"] == {"ename": "CommandExecError", "evalue": "3", "traceback": ["exit status 3"]}
    assert isinstance(err["timestamp"], int)


def test_the_sdk_parses_our_frames() -> None:
    raw = sse.event("execution_complete", execution_time=12, timestamp=7)
    node = decode_sse_event_data(raw.removeprefix(b"data: ").decode())
    assert node is not None
    assert (node.type, node.execution_time_in_millis, node.timestamp) == ("execution_complete", 12, 7)


def test_output_events_escape_what_json_needs_and_copy_the_rest() -> None:
    lines = [b"plain text", b'quote " and \\ backslash', b"tab\there", "üñí".encode(), b"\xff\xfe bad", b"\x00"]
    payloads = frames(sse.output_events("stdout", lines, 42))
    assert [p["text"] for p in payloads] == [
        "plain text",
        'quote " and \\ backslash',
        "tab\there",
        "üñí",
        "\ufffd\ufffd bad",
        "\x00",
    ]
    assert all(p["type"] == "stdout" and p["timestamp"] == 42 for p in payloads)


def test_splitter_handles_lf_crlf_and_lone_cr() -> None:
    splitter = sse.LineSplitter()
    assert splitter.feed(b"a\nb\r\nc\rd") == [b"a", b"b", b"c"]
    assert splitter.flush() == [b"d"]
    assert splitter.flush() == []


def test_splitter_keeps_crlf_split_across_reads_as_one_terminator() -> None:
    splitter = sse.LineSplitter()
    assert splitter.feed(b"one\r") == [b"one"]
    assert splitter.feed(b"\ntwo\n") == [b"two"]
    assert splitter.feed(b"\n") == [b""]  # a real empty line is still a line


def test_splitter_joins_partial_lines_across_reads() -> None:
    splitter = sse.LineSplitter()
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == [b"hello"]
    assert splitter.feed(b"ld\n") == [b"world"]


def test_splitter_bounds_a_line_without_newline_and_keeps_utf8_whole() -> None:
    splitter = sse.LineSplitter(max_line=10)
    pieces = splitter.feed(b"123456789" + "é".encode() + b"xyz")  # é straddles the 10-byte limit
    assert pieces == [b"123456789"]
    assert splitter.flush() == ["é".encode() + b"xyz"]
    long = sse.LineSplitter(max_line=4)
    assert long.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert long.flush() == [b"ij"]


def test_utf8_cut_never_splits_a_character() -> None:
    data = "aé€😀".encode()
    for limit in range(1, len(data)):
        cut = sse.utf8_cut(data, limit)
        data[:cut].decode()  # no UnicodeDecodeError
        assert cut <= limit
