"""Predictions over HTTP from a trained model folder: JSON in, JSON out, one process, standard library only.

    python -m lorasent.serve runs/tune/latest/final_model          # http://127.0.0.1:8000
    curl -s http://127.0.0.1:8000/predict -d '{"texts": ["Works great.", "Broke after a day."]}'

`POST /predict` takes `{"texts": [...]}` and answers `{"predictions": [...]}`, one per text in order, each as
`lorasent.predict.Prediction` (label, label_id, probabilities, truncated, error): a text that cannot be scored (empty,
not a string) gets its error there without failing the others, as in `Predictor.predict`. `GET /health` names the
model and its labels and counts what was served (a query string is ignored). A request that is not such JSON, or too
large, gets a 4xx status with `{"error": ...}` naming the fix; each connection carries one request.

At most `--max_connections` connections are served at once (one thread each); each one past them is answered 503
with Retry-After at once. A client has `--read_timeout` seconds to send its whole request, however it trickles it in.
A body over `--max_request_mb` is read and dropped (up to DISCARD_MB, within that time) after its 413, so that a client
that sends its whole body before reading the answer (Python's urllib, requests) gets the 413 rather than a reset.

Texts of requests that arrive while the model is busy are scored together in its next `Predictor.predict` call, so
concurrent clients share forward passes (and a GPU) instead of queueing one call each; when such a call fails (out of
memory, say), each of its requests is scored again alone, so that only the one(s) that fail get the error. SIGTERM or
Ctrl-C stops accepting and answers the requests already received before the process exits. The server has no
authentication: it listens on 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from transformers.utils import logging as hf_logging

from lorasent.cpus import cap_torch_threads
from lorasent.errors import ConfigError, LorasentError
from lorasent.predict import Prediction, Predictor, Text, add_predictor_options, predictor_from_args
from lorasent.process import exit_process

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
REQUEST_FORMAT = 'Send a JSON object {"texts": ["a review", ...]} with Content-Type application/json.'
ROUTES = "GET /health or POST /predict."
DISCARD_MB = 64  # the most of a refused body that is read (and dropped) so that its client gets the answer
RETRY_AFTER_S = 1  # a client refused for want of a connection may try again after this
REFUSED_LINGER_S = 2  # the most a refused client's request is waited for, to be read, before its connection closes
REFUSED_MAX = 128  # refused connections waited for at once (files open: --max_connections and these)


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a message that names the fix."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Batcher:
    """Scores the texts of every request waiting when the model is free in one `Predictor.predict` call.

    One thread runs the model, so requests never compete for it; it takes what has queued up to a batch's worth of
    texts, which costs a lone request no waiting.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.waiting: queue.SimpleQueue[tuple[list[Any], Future[list[Prediction]]]] = queue.SimpleQueue()
        self.stats = {"requests": 0, "texts": 0, "predict_calls": 0}
        threading.Thread(target=self._run, name="lorasent-serve-model", daemon=True).start()

    def predict(self, texts: list[Any]) -> list[Prediction]:
        done: Future[list[Prediction]] = Future()
        self.waiting.put((texts, done))
        return done.result()

    def _run(self) -> None:
        while True:
            requests = [self.waiting.get()]
            while sum(len(texts) for texts, _ in requests) < self.predictor.batch_size and not self.waiting.empty():
                requests.append(self.waiting.get())
            self._score(requests)

    def _score(self, requests: list[tuple[list[Any], Future[list[Prediction]]]]) -> None:
        """Answers `requests` from one call; if it fails, from one call each, so a failure is only its request's."""
        texts = [text for batch, _ in requests for text in batch]
        try:
            predictions = self.predictor.predict(texts)
        except Exception as e:  # e.g. out of GPU memory, or a text the model fails on: the server goes on
            if len(requests) == 1:
                requests[0][1].set_exception(e)
                return
            print(f"predict failed on {len(requests)} requests at once ({e!r}); scoring each alone", file=sys.stderr)
            for request in requests:
                self._score([request])
            return
        self.stats["requests"] += len(requests)
        self.stats["texts"] += len(texts)
        self.stats["predict_calls"] += 1
        start = 0
        for batch, done in requests:
            done.set_result(predictions[start : start + len(batch)])
            start += len(batch)


def read_texts(body: bytes, max_texts: int) -> list[Text]:
    """The texts of a /predict body; RequestError says what is wrong with it."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, a number over 4300 digits, nesting too deep
        raise RequestError(HTTPStatus.BAD_REQUEST, f"The body is not JSON ({e}). {REQUEST_FORMAT}") from None
    texts = request.get("texts") if isinstance(request, dict) else None
    if not isinstance(texts, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, f'The body has no "texts" list. {REQUEST_FORMAT}')
    if len(texts) > max_texts:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(texts)} texts in one request; this server takes at most {max_texts} (--max_texts). Send them in "
            "several requests.",
        )
    return texts


class Deadline(io.RawIOBase):
    """A connection's reads, each given only what is left of one deadline: a client that sends a byte now and then
    (slowloris) cannot hold its thread longer, as it could under a timeout per read."""

    def __init__(self, connection: socket.socket, seconds: float) -> None:
        self.connection = connection
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            self.connection.settimeout(max(self.deadline - time.monotonic(), 1e-6))  # past it: times out at once
            return self.connection.recv_into(buffer)
        except TimeoutError:
            raise TimeoutError(f"the request took over {self.seconds:g} s (--read_timeout)") from None
        finally:
            self.connection.settimeout(self.seconds)  # what writing the answer may take per send


class Server(ThreadingHTTPServer):
    """A thread per connection, as `ThreadingHTTPServer`, up to `max_connections` at once (those past them are
    answered 503 at once, by the thread that accepts), that answers the requests in progress when it stops."""

    request_queue_size = socket.SOMAXCONN  # a burst of connections waits to be accepted instead of being reset
    daemon_threads = False  # server_close() waits for the answers in progress (a stalled client: --read_timeout)

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # IPv6 addresses too
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self.refused: dict[socket.socket, float] = {}  # connections answered 503: when each is closed at the latest
        super().__init__((host, port), BaseHTTPRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.slots.acquire(blocking=False):
            super().process_request(request, client_address)
        else:
            self._refuse_busy(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse_busy(self, connection: socket.socket) -> None:
        """503 without a thread: a send that fits an empty socket buffer, then what the client sends is read and
        dropped by `service_actions` until it closes or for REFUSED_LINGER_S (closed unread, it would be reset)."""
        error = (
            f"The server is at its {self.max_connections} connections (--max_connections). Try again in "
            f"{RETRY_AFTER_S} s, or start it with a larger --max_connections."
        )
        body = json.dumps({"error": error}).encode()
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
        )
        connection.setblocking(False)
        try:
            connection.send(head.encode() + body)
            connection.shutdown(socket.SHUT_WR)
        except OSError:  # it has left
            connection.close()
            return
        if len(self.refused) >= REFUSED_MAX:  # a flood: the oldest is closed, read or not
            oldest = next(iter(self.refused))
            del self.refused[oldest]
            oldest.close()
        self.refused[connection] = time.monotonic() + REFUSED_LINGER_S

    def service_actions(self) -> None:
        """Between connections (and twice a second): reads what the refused clients sent, closes those done."""
        super().service_actions()
        now = time.monotonic()
        for connection, deadline in list(self.refused.items()):
            try:
                done = not connection.recv(2**16) or now > deadline  # b"": the client has closed
            except BlockingIOError:
                done = now > deadline
            except OSError:
                done = True
            if done:
                del self.refused[connection]
                connection.close()

    def server_close(self) -> None:
        super().server_close()
        for connection in self.refused:
            connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that left before its answer: not an error
            super().handle_error(request, client_address)


def make_handler(
    batcher: Batcher, model_dir: str, max_texts: int, max_bytes: int, read_timeout: float
) -> type[BaseHTTPRequestHandler]:
    """The request handler class of a server of `batcher`'s model."""

    class Handler(BaseHTTPRequestHandler):
        server_version, sys_version = "lorasent", ""  # the Server header names no Python version
        protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` (curl's bodies over 1 MiB) instead of a 1 s wait
        timeout = read_timeout  # per send of the answer; reading the request has it in all (Deadline)
        unread = 0  # bytes of the request's body not read

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the socket's own reader (the socket stays open): reads go through one deadline
            self.rfile = io.BufferedReader(Deadline(self.connection, read_timeout))

        def do_GET(self) -> None:
            if urlsplit(self.path).path != "/health":
                self._refuse(HTTPStatus.NOT_FOUND, ROUTES)
                return
            labels = batcher.predictor.label_names
            self._answer(HTTPStatus.OK, {"status": "ok", "model_dir": model_dir, "labels": labels, **batcher.stats})

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length", "")
            declared = int(length) if length.isascii() and length.isdigit() else None  # "²" isdigit, not to int
            self.unread = declared or 0
            try:
                if urlsplit(self.path).path != "/predict":
                    raise RequestError(HTTPStatus.NOT_FOUND, ROUTES)
                texts = read_texts(self._body(declared), max_texts)
            except RequestError as e:
                self._refuse(e.status, str(e))
                return
            try:
                predictions = batcher.predict(texts)
            except Exception as e:
                self.log_error("predict failed: %r", e)
                self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
                return
            self._answer(HTTPStatus.OK, {"predictions": [dataclasses.asdict(p) for p in predictions]})

        def _body(self, declared: int | None) -> bytes:
            if declared is None:
                raise RequestError(
                    HTTPStatus.LENGTH_REQUIRED,
                    f"The request has no valid Content-Length (a chunked body is not read). {REQUEST_FORMAT}",
                )
            if self.unread > max_bytes:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"The body has {self.unread:,} bytes; this server takes at most {max_bytes:,} (--max_request_mb). "
                    "Send the texts in several requests.",
                )
            try:
                body = self.rfile.read(self.unread)
            except TimeoutError as e:
                raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"{str(e).capitalize()}. Send it faster.") from None
            self.unread = 0
            return body

        def _discard_unread(self) -> None:
            """Reads (and drops) what is left of a refused body, so that a client that sends it whole before reading
            (urllib) gets its answer; past DISCARD_MB or --read_timeout the connection is closed unread."""
            if self.unread > DISCARD_MB * 2**20:
                return
            try:
                while self.unread > 0 and (chunk := self.rfile.read1(min(self.unread, 2**16))):
                    self.unread -= len(chunk)
            except OSError:  # too slow, or gone
                pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The standard library's own refusals (an unknown method, a malformed request) in JSON too."""
            status = HTTPStatus(code)
            self._refuse(status, f"{message or status.phrase}. {ROUTES}")

        def _refuse(self, status: HTTPStatus, message: str) -> None:
            self._answer(status, {"error": message})

        def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")  # no keep-alive: an unread body is never taken for a request
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self._discard_unread()

    return Handler


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lorasent.serve",
        description="Serve predictions of a trained lorasent model folder over HTTP (POST /predict, GET /health).",
        epilog="Exit status: 0 when stopped (Ctrl-C or SIGTERM: the requests received are answered first; a second "
        "one ends it at once), 2 when refused (bad options, model folder, or a port that cannot be listened on).",
    )
    add_predictor_options(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default: %(default)s, this machine only). The server has no authentication: "
        "give 0.0.0.0 only behind a proxy or network you control.",
    )
    parser.add_argument("--port", type=int, default=8000, help="Port; 0 picks a free one (default: %(default)s).")
    parser.add_argument("--max_texts", type=int, default=1024, help="Texts per request (default: %(default)s).")
    parser.add_argument("--max_request_mb", type=float, default=16, help="Request body size (default: %(default)s).")
    parser.add_argument(
        "--max_connections",
        type=int,
        default=256,
        help="Connections served at once, a thread each (default: %(default)s); one more is answered 503 with "
        "Retry-After. Requests waiting for the model hold theirs, so give at least the clients you expect at once.",
    )
    parser.add_argument(
        "--read_timeout",
        type=float,
        default=30,
        help="Seconds a client has to send its whole request, headers and body (default: %(default)s); a slower one "
        "is answered 408 or dropped. Raise it for large bodies over slow links.",
    )
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM (docker stop, Kubernetes) stops the server as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns its exit status."""
    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    cap_torch_threads()
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.signal(signal.SIGTERM, _stop)}
    try:
        if min(args.max_texts, args.max_connections) <= 0 or not all(
            0 < value < math.inf for value in (args.max_request_mb, args.read_timeout)
        ):
            raise ConfigError(
                "--max_texts, --max_request_mb, --max_connections and --read_timeout must be positive: give each a "
                "finite number above 0."
            )
        try:  # listen first: a port in use is refused before the seconds that loading takes
            server = Server(args.host, args.port, args.max_connections)
        except (OSError, OverflowError) as e:
            raise ConfigError(
                f"Cannot listen on {args.host}:{args.port} ({e}). Pick another --port or --host."
            ) from None
        with server:
            batcher = Batcher(predictor_from_args(args))
            max_bytes = int(args.max_request_mb * 2**20)
            server.RequestHandlerClass = make_handler(
                batcher, str(args.model_dir), args.max_texts, max_bytes, args.read_timeout
            )
            host, port = server.server_address[:2]
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            print(f"Serving {args.model_dir} (labels: {', '.join(batcher.predictor.label_names)}) at {url}")
            print(f'  curl -s {url}/predict -d \'{{"texts": ["Works great."]}}\'', flush=True)
            if args.host not in LOOPBACK_HOSTS:
                print(f"warning: listening on {args.host} without authentication", file=sys.stderr, flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:  # leaving `with server` waits for the answers in progress
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C or SIGTERM ends the process at once
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                print(
                    "stopping: answering the requests received (Ctrl-C again to quit now)", file=sys.stderr, flush=True
                )
                raise
    except LorasentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, while serving or while the model loads
        print("stopped", file=sys.stderr)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    exit_process(main())
