"""A stand-in for SGLang's native HTTP API, for tests on machines without a GPU.

It is a test double, not SGLang: it answers ``POST /generate`` with the shapes SGLang 0.5.23
documents in ``sglang/srt/managers/io_struct.py`` and ``tokenizer_manager.py``: a request body
with ``text`` (a list for a batch) and ``sampling_params`` (a dict or a list of dicts with
``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``ebnf``); a response of one object
per batch item holding ``text`` and ``meta_info`` with ``prompt_tokens``, ``completion_tokens``,
``cached_tokens`` and ``finish_reason`` ``{"type": "stop"|"length"}``. ``GET /health_generate``
answers 200. Fault modes: ``malformed`` (a body that is not JSON), ``delay`` (seconds before
answering), ``drop`` (close the connection without an answer, as a dying process does).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class FakeSGLang(BaseHTTPRequestHandler):
    requests: list[dict] = []
    malformed = False
    delay = 0.0
    drop = False
    text = "branch {i}"

    @classmethod
    def reset(cls) -> None:
        cls.requests, cls.malformed, cls.delay, cls.drop, cls.text = [], False, 0.0, False, "branch {i}"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200 if self.path == "/health_generate" else 404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if type(self).delay:
            time.sleep(type(self).delay)
        if type(self).drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if type(self).malformed:
            self._send(200, b"{not json")
            return
        texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
        params = body["sampling_params"] if isinstance(body["sampling_params"], list) else [body["sampling_params"]] * len(texts)
        prompt_tokens = len(texts[0].split())
        items = []
        for i, p in enumerate(params):
            n = p["max_new_tokens"]
            items.append(
                {
                    "text": type(self).text.format(i=i) if n else "",
                    "output_ids": [1] * min(n, 2),
                    "meta_info": {
                        "id": f"rid_{i}",
                        "finish_reason": {"type": "length", "length": n} if n == 0 else {"type": "stop", "matched": 1},
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": min(n, 2),
                        "cached_tokens": prompt_tokens - 1 if isinstance(body["text"], list) else 0,
                        "e2e_latency": 0.01,
                        **(
                            {"output_token_logprobs": [[-0.25, 1, None], [-0.25, 1, None]][: min(n, 2)]}
                            if body.get("return_logprob")
                            else {}
                        ),
                    },
                }
            )
        self._send(200, json.dumps(items if isinstance(body["text"], list) else items[0]).encode())


class StandIn:
    """The stand-in on a loopback port; ``stop`` takes it away, ``start`` brings it back there."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandIn":
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), FakeSGLang)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
