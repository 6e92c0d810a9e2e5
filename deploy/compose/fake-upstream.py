#!/usr/bin/env python3
"""A stand-in backend for deploy/compose.yaml, standard library only.

GET /internal/orders/<id>/stream   server-sent events: one event per order every INTERVAL
                                   seconds, `id:` a sequence number shared by every connection
                                   (derived from the clock), so two pollmux nodes see the same
                                   ids; `Last-Event-ID` replays what was missed (up to 100).
GET /healthz                       200 "ok"

Listens on 0.0.0.0:3000 (FAKE_UPSTREAM_ADDR="host:port" to change; port 0 picks a free one
and prints it). Every stream is closed after STREAM_SECONDS, so reconnects and resumes happen.
"""

import os
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INTERVAL = float(os.environ.get("FAKE_UPSTREAM_INTERVAL", "2"))
STREAM_SECONDS = float(os.environ.get("FAKE_UPSTREAM_STREAM_SECONDS", "300"))
REPLAY_MAX = 100
STREAM_PATH = re.compile(r"^/internal/orders/([0-9]{1,20})/stream$")


def current_seq():
    return int(time.time() / INTERVAL)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/healthz":
            self.reply(200, "text/plain", b"ok\n")
            return
        match = STREAM_PATH.match(self.path)
        if not match:
            self.reply(404, "text/plain", b"not found\n")
            return
        self.stream(match.group(1))

    def reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, order):
        last = self.headers.get("Last-Event-ID", "")
        seq = current_seq()
        start = int(last) + 1 if last.isdigit() else seq + 1
        start = max(start, seq - REPLAY_MAX + 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        deadline = time.monotonic() + STREAM_SECONDS
        try:
            self.wfile.write(f"retry: {int(INTERVAL * 1000)}\n\n".encode())
            next_seq = start
            while time.monotonic() < deadline:
                while next_seq <= current_seq():
                    data = f'{{"order": {order}, "seq": {next_seq}, "status": "step-{next_seq % 5}"}}'
                    self.wfile.write(f"id: {next_seq}\ndata: {data}\n\n".encode())
                    next_seq += 1
                self.wfile.flush()
                time.sleep(min(INTERVAL / 4, 0.5))
        except (BrokenPipeError, ConnectionResetError):
            pass  # pollmux closed the subscription (no more polls, after `linger`)

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-upstream: " + (fmt % args) + "\n")


def main():
    host, _, port = os.environ.get("FAKE_UPSTREAM_ADDR", "0.0.0.0:3000").rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    print(f"fake-upstream listening on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
