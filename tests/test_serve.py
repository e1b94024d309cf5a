"""The prediction server: the same predictions as `Predictor` over HTTP, concurrent requests answered each with its
own, bad requests refused with a status and a message, loopback by default, a clean stop."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from test_predict import TEXTS, model_dir  # noqa: F401 (a fixture)

from lorasent.predict import Predictor
from lorasent.serve import Batcher, RequestError, read_texts

ROOT = Path(__file__).parents[1]
MAX_TEXTS = 8


def _start(model_dir: Path, *options: str) -> subprocess.Popen:  # noqa: F811
    return subprocess.Popen(
        [sys.executable, "-m", "lorasent.serve", str(model_dir), "--device", "cpu", *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:  # noqa: F811
    """(base URL, process) of a server on a free port, taking at most MAX_TEXTS texts and 4 KiB a request."""
    process = _start(model_dir, "--port", "0", "--max_texts", str(MAX_TEXTS), "--max_request_mb", str(4 / 1024))
    try:
        line = process.stdout.readline()
        found = re.search(r" at (http://\S+)$", line.strip())
        assert found, line + process.stderr.read()
        yield found[1], process
    finally:
        process.kill()
        process.wait()


def _request(url: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _connect(base: str) -> socket.socket:
    return socket.create_connection((urlsplit(base).hostname, urlsplit(base).port), timeout=60)


def _read_answer(connection: socket.socket, method: str = "POST") -> tuple[int, bytes]:
    answer = http.client.HTTPResponse(connection, method=method)
    answer.begin()
    return answer.status, answer.read()


def _post(texts: list[Any]) -> bytes:
    """A raw POST /predict of `texts`."""
    body = json.dumps({"texts": texts}).encode()
    return f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def _predict(base: str, texts: list[Any]) -> list[dict[str, Any]]:
    status, answer = _request(f"{base}/predict", json.dumps({"texts": texts}).encode())
    assert status == 200, answer
    return answer["predictions"]


def _assert_same(served: list[dict[str, Any]], expected: list[Any]) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert (got["label"], got["label_id"], got["error"]) == (want.label, want.label_id, want.error)
        assert got["probabilities"].keys() == want.probabilities.keys()
        for name, probability in want.probabilities.items():
            assert got["probabilities"][name] == pytest.approx(probability, abs=1e-5)


def test_it_listens_on_loopback_and_serves_what_the_predictor_predicts(server, model_dir: Path) -> None:  # noqa: F811
    base, _ = server
    assert base.startswith("http://127.0.0.1:")
    status, health = _request(f"{base}/health?probe=1")  # a load balancer's query string is ignored
    assert status == 200 and health["status"] == "ok" and health["labels"] == ["negative", "positive"]
    texts = [*TEXTS[:4], "", 7, None, "\ud800"]  # four that cannot be scored: each gets its error, the others labels
    served = _predict(base, texts)
    _assert_same(served, Predictor.from_dir(model_dir, device="cpu").predict(texts))
    assert [p["error"] is None for p in served] == [True] * 4 + [False] * 4
    assert "expected text, got int" in served[5]["error"] and "not valid Unicode" in served[7]["error"]


def test_concurrent_requests_each_get_their_own_predictions(server, model_dir: Path) -> None:  # noqa: F811
    base, _ = server
    requests = [[TEXTS[i % len(TEXTS)], f"{TEXTS[(i + 1) % len(TEXTS)]} {i}"][: 1 + i % 2] for i in range(24)]
    before = _request(f"{base}/health")[1]
    with ThreadPoolExecutor(max_workers=12) as pool:
        served = list(pool.map(lambda texts: _predict(base, texts), requests))
    predictor = Predictor.from_dir(model_dir, device="cpu")
    for texts, answer in zip(requests, served, strict=True):
        _assert_same(answer, predictor.predict(texts))
    after = _request(f"{base}/health")[1]
    assert after["requests"] - before["requests"] == len(requests)
    assert after["texts"] - before["texts"] == sum(map(len, requests))


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/predict", b"not json", 400, 'The body is not JSON .*Send a JSON object {"texts"'),
        ("/predict", b"\xff\xfe\xfd", 400, "The body is not JSON"),
        ("/predict", b'{"text": "one review"}', 400, 'The body has no "texts" list'),
        ("/predict", b'["a", "b"]', 400, 'The body has no "texts" list'),
        ("/predict", json.dumps({"texts": ["ok"] * (MAX_TEXTS + 1)}).encode(), 413, "at most 8 \\(--max_texts\\)"),
        ("/predict", json.dumps({"texts": ["x" * 5000]}).encode(), 413, "at most 4,096 \\(--max_request_mb\\)"),
        # urllib sends a body whole before it reads: one past the socket buffers reached it as a broken pipe
        ("/predict", json.dumps({"texts": ["x" * 2**23]}).encode(), 413, "8,388,623 bytes; .* at most 4,096"),
        ("/nowhere", b"{}" + b" " * 2**23, 404, "GET /health or POST /predict"),
        ("/nowhere", b"{}", 404, "GET /health or POST /predict"),
        ("/predict", None, 404, "GET /health or POST /predict"),
    ],
)
def test_bad_requests_get_a_status_and_the_fix(
    server, path: str, body: bytes | None, status: int, message: str
) -> None:
    base, process = server
    got, answer = _request(f"{base}{path}", body)
    assert got == status and re.search(message, answer["error"]), answer
    assert _predict(base, ["still serving"])[0]["error"] is None and process.poll() is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than Python's recursion limit
        b'{"texts": [' + b"9" * 5000 + b"]}",  # more digits than Python turns into an int
    ],
)
def test_json_that_python_cannot_read_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(RequestError, match="The body is not JSON") as refused:
        read_texts(body, MAX_TEXTS)
    assert refused.value.status == 400


@pytest.mark.parametrize(
    ("request_bytes", "method", "status", "message"),
    [
        (b"POST /predict HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}", "POST", 411, "no valid Content-Length"),
        (b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "POST", 411, "chunked"),
        (b"PUT /predict HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "PUT", 501, "'PUT'.*GET /health or POST /predict"),
        (b"HEAD /health HTTP/1.1\r\n\r\n", "HEAD", 501, None),  # an answer to HEAD has no body
    ],
)
def test_requests_urllib_would_not_send_are_answered_in_json(
    server, request_bytes: bytes, method: str, status: int, message: str | None
) -> None:
    base, process = server
    with _connect(base) as connection:
        connection.sendall(request_bytes)
        got, body = _read_answer(connection, method)
    assert got == status and (body == b"" if message is None else re.search(message, json.loads(body)["error"]))
    assert _predict(base, ["still serving"])[0]["error"] is None and process.poll() is None


def test_expect_100_continue_is_answered_before_the_body_is_sent(server) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 MiB and waits a second for the answer before sending."""
    base, _ = server
    body = json.dumps({"texts": ["Great."]}).encode()
    with _connect(base) as connection:
        connection.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert connection.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n")
        connection.sendall(body)
        status, answer = _read_answer(connection)
    assert status == 200 and json.loads(answer)["predictions"][0]["error"] is None


def test_connections_past_the_cap_get_a_503_and_slow_clients_are_dropped(model_dir: Path) -> None:  # noqa: F811
    """Idle connections (slowloris) hold a thread each: past --max_connections they are answered 503 at once instead
    of starting more, and one that trickles its request in is dropped after --read_timeout in all."""
    process = _start(model_dir, "--port", "0", "--max_connections", "2", "--read_timeout", "2")
    try:
        base = re.search(r" at (http://\S+)$", process.stdout.readline().strip())[1]
        idle = [_connect(base) for _ in range(2)]
        trickling, stalled = idle
        stalled.sendall(b"POST /predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # then nothing
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/health", timeout=60)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert "at its 2 connections (--max_connections)" in json.loads(refused.value.read())["error"]
        status, answer = _read_answer(stalled)
        assert status == 408 and "took over 2 s (--read_timeout)" in json.loads(answer)["error"]
        with pytest.raises(OSError):  # a byte a second is never a timeout of one read, but it is one of them all
            for _ in range(600):
                trickling.sendall(b"G")
                time.sleep(1)
        stalled.close()
        trickling.close()
        status, health = _request(f"{base}/health")  # the slots are free again
        assert status == 200 and health["status"] == "ok"
    finally:
        process.kill()
        _, err = process.communicate()
    assert "Traceback" not in err, err


def test_a_failed_batch_fails_only_the_request_that_fails(model_dir: Path, capfd) -> None:  # noqa: F811
    """A batched call that raises (out of memory, or a text the model fails on) is scored again request by request,
    so only the request that fails gets the error; the model here fails on the word "battery" (TEXTS[1])."""
    predictor = Predictor.from_dir(model_dir, device="cpu")
    hold, fail = (predictor.tokenizer.convert_tokens_to_ids(word) for word in ("phone", "battery"))
    holding, released = threading.Event(), threading.Event()

    def forward(module: Any, args: Any, inputs: dict[str, Any]) -> None:
        if (inputs["input_ids"] == hold).any():  # keeps the model busy while the next requests queue up
            holding.set()
            released.wait()
        if (inputs["input_ids"] == fail).any():
            raise RuntimeError("CUDA out of memory (a stand-in)")

    predictor.model.register_forward_pre_hook(forward, with_kwargs=True)
    batcher = Batcher(predictor)
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(batcher.predict, ["My phone."])
        holding.wait()
        failing, fine = pool.submit(batcher.predict, [TEXTS[1]]), pool.submit(batcher.predict, TEXTS[2:4])
        while batcher.waiting.qsize() < 2:
            time.sleep(0.01)
        released.set()
        with pytest.raises(RuntimeError, match="out of memory"):
            failing.result()
        _assert_same([dataclasses.asdict(p) for p in fine.result()], predictor.predict(TEXTS[2:4]))
        assert first.result()[0].error is None
    assert "predict failed on 2 requests at once (RuntimeError('CUDA out of memory" in capfd.readouterr().err


def test_sigterm_answers_the_requests_received_and_stops_cleanly(model_dir: Path) -> None:  # noqa: F811
    process = _start(model_dir, "--port", "0", "--batch_size", "1")
    try:
        base = re.search(r" at (http://\S+)$", process.stdout.readline().strip())[1]
        with _connect(base) as leaving:  # a client that goes before its answer: a reset, no traceback in the log
            leaving.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leaving.sendall(_post(TEXTS))
        waiting = [_connect(base) for _ in range(3)]
        for connection in waiting:
            connection.sendall(_post([f"{text} {i}" for i in range(60) for text in TEXTS]))  # seconds of work
        # Connections are accepted in turn: once /health is answered, the three requests are being served.
        assert _request(f"{base}/health")[0] == 200
        process.send_signal(signal.SIGTERM)
        statuses = [_read_answer(connection)[0] for connection in waiting]
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert statuses == [200] * 3 and process.returncode == 0, err
    assert "stopping: answering the requests received" in err and err.strip().endswith("stopped"), err
    assert "Traceback" not in err, err


def test_it_listens_on_ipv6(tmp_path: Path, capsys) -> None:
    """`--host ::1` (or `::`, every interface) binds an IPv6 socket: the folder is what it refuses, not the host."""
    from lorasent.serve import main

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    assert main([str(tmp_path / "no-model-here"), "--host", "::1", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: Model folder"), "refused before the model folder"


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        process = _start(tmp_path / "no-model-here", "--port", port)  # the folder is never looked at
        out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and out == "", out
    assert err.startswith(f"error: Cannot listen on 127.0.0.1:{port} (") and "Pick another --port" in err, err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max_texts", "0"], "--max_texts, --max_request_mb, --max_connections and --read_timeout must be positive"),
        (["--max_request_mb", "nan"], "--max_texts, --max_request_mb, .* must be positive"),
        (["--max_connections", "0"], "--max_texts, --max_request_mb, --max_connections .* must be positive"),
        (["--read_timeout", "inf"], "--max_texts, .* --read_timeout must be positive"),
        (["--port", "70000"], "Cannot listen on 127.0.0.1:70000 \\(.*port must be 0-65535"),
    ],
)
def test_impossible_options_are_one_error_line(tmp_path: Path, capsys, options: list[str], message: str) -> None:
    from lorasent.serve import main

    assert main([str(tmp_path / "no-model-here"), *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"error: {message}", err), err
