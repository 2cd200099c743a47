"""The instruction-count tool's own parts: reading answers off a socket, and callgrind's totals."""

from __future__ import annotations

import socket
from pathlib import Path

import instructions
import pytest
from harness import BenchError


def test_read_response_reads_pipelined_answers_one_at_a_time() -> None:
    ours, theirs = socket.socketpair()
    try:
        answers = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"
            b"HTTP/1.1 500 Internal\r\nContent-Length: 5\r\n\r\nerror"
        )
        theirs.sendall(answers)
        buffer = bytearray()
        assert [instructions.read_response(ours, buffer) for _ in range(3)] == [200, 202, 500]
        assert buffer == b""
    finally:
        ours.close()
        theirs.close()


def test_read_response_refuses_an_answer_without_a_length_or_cut_short() -> None:
    for data in (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok",
    ):
        ours, theirs = socket.socketpair()
        try:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            with pytest.raises(BenchError):
                instructions.read_response(ours, bytearray())
        finally:
            ours.close()
            theirs.close()


def test_total_instructions_reads_callgrinds_summary(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 123456789\ntotals: 123456789\n"
    )
    assert instructions.total_instructions(out) == 123456789
    out.write_text("events: Ir\n")
    with pytest.raises(BenchError):
        instructions.total_instructions(out)


def test_the_function_queues_on_the_runs_own_queue() -> None:
    """Against the real services, a run's calls go to a queue of its own (and its keys carry its own
    prefix): nothing it leaves can reach another gateway, worker or test on the same broker."""
    from txfaas.model import FunctionSpec

    spec = FunctionSpec.from_json(instructions.function(8080, "instructions-abc"))
    assert spec.queue == "instructions-abc"
    assert spec.base_url("http://{name}:8080") == "http://127.0.0.1:8080"
