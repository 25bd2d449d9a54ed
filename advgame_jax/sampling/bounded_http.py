"""An HTTP server with bounded threads and a real listen backlog (for ``sampling.server``).

The stdlib ``ThreadingHTTPServer`` starts one thread per connection without limit and listens
with a backlog of 5, so a burst of clients sees connection resets. Here at most
``max_connections`` threads serve connections with the normal handler and up to
``max_overflow`` more serve them with an "overloaded" handler (which reads the request and
answers 503, so the client is told to retry); beyond both, new connections wait in the
kernel's backlog (``backlog``) until a thread is free.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class BoundedHTTPServer(ThreadingHTTPServer):
    """See the module docstring. ``closing``: once set, waiting connections are closed."""

    daemon_threads = True

    def __init__(self, address, handler, overflow_handler, *, max_connections: int,
                 max_overflow: int, backlog: int, closing: threading.Event):
        self.request_queue_size = max(1, int(backlog))  # read by server_activate's listen()
        self._slots = ((threading.BoundedSemaphore(max(1, int(max_connections))), handler),
                       (threading.BoundedSemaphore(max(1, int(max_overflow))), overflow_handler))
        self._free = threading.Condition()
        self._closing = closing
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        while True:
            for slot, handler in self._slots:
                if slot.acquire(blocking=False):
                    threading.Thread(target=self._serve_one, daemon=True,
                                     args=(request, client_address, slot, handler)).start()
                    return
            if self._closing.is_set():  # shutting down: nobody will free a thread
                self.shutdown_request(request)
                return
            with self._free:  # every thread busy: wait (the kernel keeps queueing in the backlog)
                self._free.wait(0.05)

    def _serve_one(self, request, client_address, slot, handler):
        try:
            handler(request, client_address, self)
        except Exception:  # noqa: BLE001 - as socketserver.handle_error: never kill the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()
            with self._free:
                self._free.notify()
