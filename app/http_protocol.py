"""uvicorn's httptools protocol with a bound on the size of a request's head (request line and headers).

httptools, the parser uvicorn picks where it is installed (faster than h11, less CPU per request), caps
no header, and uvicorn appends each chunk of a header's value to what it holds: a 96 MiB header sent by a
client without any key cost ~10 s of the event loop's CPU, stalling every request meanwhile (h11 caps a
head at 16 KiB). Here a head still incomplete past :data:`MAX_HEAD_BYTES` is answered 431 and the
connection closed (a head that arrives whole in one read, parsed once, is let through).
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Request line and headers together; browsers send a few KiB, proxies commonly allow 8-64 KiB.
MAX_HEAD_BYTES = 64 * 1024

log = logging.getLogger("sglora.app")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes received while a request's head is incomplete: only chunks that arrive with a head
    already in progress (a chunk that ends a body and starts the next pipelined request is not counted, so
    a large body is never mistaken for a head). A head is cut within :data:`MAX_HEAD_BYTES` plus two reads."""

    _head: int | None = 0  # bytes of the head in progress; None once its headers are complete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        counted = self._head is not None
        super().data_received(data)
        if not counted or self._head is None or self.transport.is_closing():
            return
        self._head += len(data)
        if self._head > MAX_HEAD_BYTES:
            log.warning("request head over %d bytes from %s: 431, connection closed", MAX_HEAD_BYTES, self.client)
            msg = f"request line and headers over {MAX_HEAD_BYTES} bytes"
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: " + str(len(msg)).encode() + b"\r\nconnection: close\r\n\r\n" + msg.encode()
            )
            self.transport.close()
