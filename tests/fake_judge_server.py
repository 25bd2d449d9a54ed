"""A scripted OpenAI-compatible judge server for tests, on 127.0.0.1 with an ephemeral port.

``FakeJudgeServer(script, models=("judge",))`` serves ``GET /v1/models`` (those ids) and
``POST /v1/chat/completions`` / ``POST /v1/completions`` over HTTP/1.1 keep-alive, one thread
per connection (``connections`` counts the TCP connections accepted).
``script(prompt, hit) -> action`` decides every POST, where ``hit`` counts earlier POSTs with
the same prompt (the last user message, or the completions ``prompt``):

- ``("ok", content)``: a normal completion whose text is ``content``;
- ``("status", code)`` / ``("status", code, body, headers)``: an HTTP error response
  (``headers``: e.g. ``{"Retry-After": "1"}``);
- ``("sleep", seconds, content)``: answer ``content`` after a delay (client timeouts);
- ``("raw", body_bytes)``: a 200 response with this exact body (malformed JSON);
- ``("trickle", seconds_per_byte, content)``: headers at once, then the body one byte at a
  time (a server that keeps a connection alive without ever finishing in time);
- ``("trickle_headers", seconds_per_byte)``: the status line and headers one byte at a time.

``in_flight`` / ``max_in_flight``: POSTs being served now / the most at any moment.

``marker_script`` is a ready-made script for the advgame_v1 templates: it reads the
responses (or the attack) out of the judge prompt and answers from markers in them:
``SCORE=n`` gives that score, ``FAITH=True|False`` that verdict, and ``FAULT_TIMEOUT``,
``FAULT_500``, ``FAULT_JSON``, ``FAULT_GARBAGE`` produce that fault on every hit,
``FAULT_ONCE`` an HTTP 500 on the first hit only.
"""

from __future__ import annotations

import collections
import http.server
import json
import re
import threading
import time
from typing import Callable

_TAGS = ("response_A", "response_B", "response", "rewritten_prompt", "prompt")


def _between(prompt: str, tag: str):
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", prompt, re.DOTALL)
    return m.group(1) if m else None


def marker_script(timeout_sleep: float = 1.0) -> Callable:
    def script(prompt: str, hit: int):
        parts = {t: _between(prompt, t) for t in _TAGS}
        text = " ".join(v for v in parts.values() if v)
        if "FAULT_TIMEOUT" in text:
            return ("sleep", timeout_sleep, "<score>5</score>")
        if "FAULT_500" in text or ("FAULT_ONCE" in text and hit == 0):
            return ("status", 500)
        if "FAULT_JSON" in text:
            return ("raw", b'{"choices": [ {"message": ')
        if "FAULT_GARBAGE" in text:
            return ("ok", "Both responses have merits; hard to say.")

        def score(t):
            m = re.search(r"SCORE=(\d+)", t or "")
            return m.group(1) if m else "0"

        # The faithfulness question holds the attack in <rewritten_prompt> (advgame_v1) or in
        # <prompt> with an <answer> verdict asked for (advgame_paper).
        attack = parts["rewritten_prompt"]
        if attack is None and "<answer>" in prompt:
            attack = parts["prompt"]
        if attack is not None:
            m = re.search(r"FAITH=(True|False)", attack)
            return ("ok", f"Reasoning. <answer>{m.group(1) if m else 'True'}</answer>")
        if parts["response_A"] is not None:
            return (
                "ok",
                f"Compare. <score_A>{score(parts['response_A'])}</score_A> "
                f"<score_B>{score(parts['response_B'])}</score_B>",
            )
        return ("ok", f"Rate. <score>{score(parts['response'])}</score>")

    return script


class FakeJudgeServer:
    def __init__(self, script: Callable, models=("judge",)):
        self.script = script
        self.models = tuple(models)
        self.lock = threading.Lock()
        self.connections = 0
        self.hits = 0
        self.hits_by_prompt: collections.Counter = collections.Counter()
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200,
                        json.dumps(
                            {
                                "object": "list",
                                "data": [{"id": m, "object": "model"} for m in server.models],
                            }
                        ).encode(),
                    )
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = self.path.rstrip("/") == "/v1/chat/completions"
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with server.lock:
                    server.hits += 1
                    hit = server.hits_by_prompt[prompt]
                    server.hits_by_prompt[prompt] += 1
                    server.requests.append(
                        {"body": body, "path": self.path, "auth": self.headers.get("Authorization")}
                    )
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._act(body, server.script(prompt, hit), chat)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _act(self, body, action, chat):
                try:
                    if action[0] == "status":
                        body_bytes = action[2] if len(action) > 2 else b""
                        self._send(action[1], body_bytes, action[3] if len(action) > 3 else None)
                        return
                    if action[0] == "trickle_headers":
                        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 50
                        for i in range(len(head)):
                            self.wfile.write(head[i : i + 1])
                            self.wfile.flush()
                            time.sleep(action[1])
                        return
                    if action[0] == "raw":
                        self._send(200, action[1])
                        return
                    if action[0] == "sleep":
                        time.sleep(action[1])
                    if action[0] == "trickle":
                        data = json.dumps(
                            {"choices": [{"message": {"content": action[2]}, "text": action[2]}]}
                        ).encode()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(action[1])
                        return
                    content = action[-1]
                    choice = (
                        {"message": {"role": "assistant", "content": content}}
                        if chat
                        else {"text": content}
                    )
                    resp = {
                        "id": "x",
                        "object": "chat.completion" if chat else "text_completion",
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", **choice}],
                    }
                    self._send(200, json.dumps(resp).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> "FakeJudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
