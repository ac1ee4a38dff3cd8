"""The HTTP side: a threaded stdlib server, request plumbing, token auth, and `HubServer` around them.

Keep-alive safety (the client keeps connections open and downloads with 8 threads): every response carries
``Content-Length``, HEAD carries no body, and a request body that a handler did not read is drained (small) or
the connection is closed (large) before the next request is parsed. Errors are JSON objects with
``X-Error-Code`` / ``X-Error-Message`` headers, which `huggingface_hub.utils.hf_raise_for_status` maps to its
exceptions. Auth: with a token set, every write needs ``Authorization: Bearer <token>`` (401 otherwise), a
wrong token is 401 on any request, and private repos answer exactly like missing ones (404 ``RepoNotFound``)
to callers without the token. Request logs carry method, path (never the query string, which holds LFS upload
signatures) and status; headers, and so tokens, are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from .names import InvalidName
from .routes import route
from .store import HubError, Repo, Store

if TYPE_CHECKING:
    from typing_extensions import Self

_JSON_LIMIT = 16 << 20
_DRAIN_LIMIT = 1 << 20
_CHUNK = 1 << 20
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_LENGTH = re.compile(r"[0-9]{1,18}")
_QUERY = re.compile(r"[?#]\S*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class HubServer:
    """A Hub-compatible server on `host:port` storing repositories under `root`.

    `lfs_threshold`: files of at least this many bytes are announced as ``"lfs"`` in preupload answers, so a
    client with ``HF_HUB_DISABLE_XET=1`` sends them through the LFS batch API; None (the default) answers
    ``"regular"`` for every file, the only mode that also works for a client with ``hf_xet`` installed, which
    would otherwise send every LFS file through Xet, a protocol this server does not speak.
    `max_upload_bytes` bounds one file and one commit; `user` is the name ``whoami`` returns and the default
    namespace; `log` writes one line per request to stderr. `token` is taken without surrounding whitespace
    (as the ``Authorization`` header is read: a token read from a file with its newline would never match); an
    empty or blank one is refused (ValueError): it would accept an empty Bearer for writes. One server per `root`: a second one is refused (OSError) while
    this one holds it; start-up, once bound and holding the root, empties the temp folders of uploads that a
    crashed server left behind.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        lfs_threshold: int | None = None,
        max_upload_bytes: int = 1 << 30,
        user: str = "local",
        log: bool = False,
    ):
        if token is not None and not token.strip():  # an empty Bearer would then be accepted for writes
            raise ValueError("the server token is empty: give a non-empty token, or none for a server without auth")
        self._httpd = _HTTPServer((host, port), Request)  # first: a start that cannot bind touches nothing
        try:
            self.store = Store(root)
        except BaseException:
            self._httpd.server_close()
            raise
        self.token, self.user, self.log = token and token.strip(), user, log
        self.lfs_threshold, self.max_upload_bytes = lfs_threshold, max_upload_bytes
        self.secret = os.urandom(32)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None
        self._foreground = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def root(self) -> Path:
        return self.store.root

    def start(self) -> HubServer:
        """Serve in a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="lora-hub-serve", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C) or `stop()` from another thread."""
        self._foreground = True
        try:
            self._httpd.serve_forever()
        finally:
            self._foreground = False
            self._close()

    def stop(self) -> None:
        if self._thread is not None or self._foreground:
            self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        """Free the port and the root."""
        self._httpd.server_close()
        self.store.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the routes ----------------------------------------------------------------------------
    def sign(self, *parts: str) -> str:
        return hmac.new(self.secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    hub: HubServer


class Request(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lora-hub"
    disable_nagle_algorithm = True  # headers and body are two writes: without it, each answer waits ~40 ms
    timeout = 120  # seconds a connection may sit idle or stall mid-body before it is dropped
    server: _HTTPServer

    # -- dispatch ----------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        self._body_left: int | None = None
        self._chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = (self.headers.get("Content-Length") or "0").strip()
        parsed = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        try:
            if not self._chunked:
                self._body_left = self._content_length(length)
            try:
                segments = [unquote(s, errors="strict") for s in parsed.path.split("/")[1:]]
            except UnicodeDecodeError:
                raise HubError(400, "the URL path is not valid UTF-8 once unquoted") from None
            route(self, self.command, segments)
        except HubError as e:
            self.send_error_json(e)
        except InvalidName as e:
            self.send_error_json(HubError(400, str(e)))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug: log it, answer 500, keep serving
            traceback.print_exc(file=sys.stderr)
            self.send_error_json(HubError(500, "internal server error (see the server's log)"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _content_length(self, length: str) -> int:
        """The announced body size; 400 (and the connection closed) for anything but digits: a negative one
        would have the body read until the client hangs up, all of it in memory."""
        if _LENGTH.fullmatch(length):
            return int(length)
        self.close_connection = True
        raise HubError(400, f"Content-Length {length[:40]!r} is not a number of bytes")

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or urlsplit(self.hub.url).netloc}"

    # -- auth --------------------------------------------------------------------------------------------
    def authorized(self) -> bool:
        """Whether the caller holds the server's token (always true if the server has none); 401 if wrong."""
        header = self.headers.get("Authorization")
        if self.hub.token is None:
            return True
        if header is None:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.hub.token.encode()
        ):
            return True
        raise HubError(401, "Invalid credentials in Authorization header")

    def require_write(self) -> None:
        if not self.authorized():
            raise HubError(401, "this server needs a token for writes: set HF_TOKEN or pass token=")

    def read_repo(self, rtype: str, repo_id: str) -> Repo:
        """A repo the caller may read; private ones look missing to callers without the token."""
        authorized = self.authorized()
        repo = self.hub.store.get(rtype, repo_id)
        if repo.meta["private"] and not authorized:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def write_repo(self, rtype: str, repo_id: str) -> Repo:
        self.require_write()
        return self.hub.store.get(rtype, repo_id)

    # -- request bodies ----------------------------------------------------------------------------------
    def body(self, limit: int) -> Iterator[bytes]:
        """The request body in chunks (Content-Length or chunked); 413 past `limit` bytes."""
        if self._chunked:
            yield from self._chunked_body(limit)
            return
        if self._body_left > limit:
            raise HubError(
                413,
                f"request body of {self._body_left} bytes is over this server's limit of {limit} "
                "bytes (lora-hub serve --max-upload-mb)",
            )
        while self._body_left:
            chunk = self.rfile.read(min(_CHUNK, self._body_left))
            if not chunk:
                self.close_connection = True
                raise ConnectionError("client closed the connection mid-body")
            self._body_left -= len(chunk)
            yield chunk

    def _chunked_body(self, limit: int) -> Iterator[bytes]:
        total = 0
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip() or b"0"
            if not _CHUNK_SIZE.fullmatch(line):
                self.close_connection = True
                raise HubError(400, f"malformed chunk size line {line[:40]!r} in a chunked request body")
            size = int(line, 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                self._chunked = False
                self._body_left = 0
                return
            total += size
            if total > limit:
                self.close_connection = True
                raise HubError(413, f"request body is over this server's limit of {limit} bytes")
            while size:
                chunk = self.rfile.read(min(_CHUNK, size))
                if not chunk:
                    self.close_connection = True
                    raise ConnectionError("client closed the connection mid-body")
                size -= len(chunk)
                yield chunk
            self.rfile.readline(16)

    def json_body(self) -> dict:
        try:
            value = json.loads(b"".join(self.body(_JSON_LIMIT)) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # the last: nested too deep
            raise HubError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise HubError(400, "request body must be a JSON object")
        return value

    def form_body(self) -> dict[str, list[str]]:
        return parse_qs(b"".join(self.body(_JSON_LIMIT)).decode("utf-8", "replace"))

    def _finish_body(self) -> None:
        """Before answering: drain what the handler left unread, or close the connection if it is large."""
        if self._chunked or (self._body_left or 0) > _DRAIN_LIMIT:
            self.close_connection = True
        elif self._body_left:
            self.rfile.read(self._body_left)
            self._body_left = 0

    # -- responses ---------------------------------------------------------------------------------------
    def send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._finish_body()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(
        self,
        value: object,
        status: int = 200,
        headers: dict | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send(status, json.dumps(value).encode(), headers, content_type)

    def send_error_json(self, error: HubError) -> None:
        """The error as JSON and in ``X-Error-Message``: ASCII, control characters (which may come from the
        request, or from a parser's multi-line message) blanked so that they cannot end the header."""
        message = _CONTROL.sub(" ", error.message.encode("ascii", "backslashreplace").decode())
        headers = {
            "X-Error-Message": message[:2000],
            **error.headers,
        }
        if error.code:
            headers["X-Error-Code"] = error.code
        self.send_json({"error": error.message, **error.extra}, error.status, headers)

    def send_file(self, path: Path, headers: dict) -> None:
        """Stream a stored file, honouring a single ``Range: bytes=a-b`` (the client resumes downloads)."""
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and "," not in wanted:
            first, _, last = wanted[6:].partition("-")
            try:
                start = int(first) if first else max(size - int(last), 0)
                end = min(int(last), size - 1) if first and last else size - 1
            except ValueError:
                start, end = 0, size - 1
            else:
                if start >= size or start > end:
                    raise HubError(
                        416,
                        f"range {wanted!r} outside the file's {size} bytes",
                        headers={"Content-Range": f"bytes */{size}"},
                    )
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        self._finish_body()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise ConnectionError(f"{path} shrank while being sent")
                self.wfile.write(chunk)
                left -= len(chunk)

    # -- logging: method, path without query, status; never headers ----------------------------------------
    def log_request(self, code="-", size="-") -> None:
        if self.hub.log:
            # `command` is None (or "") when the request line itself was refused: `path` is then unset or the
            # previous request's
            path = _QUERY.sub("", self.path)[:300] if self.command else "-"
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.command or '-'} {path} {code}\n")

    def log_message(self, format: str, *args) -> None:
        """The stdlib's own messages (`log_error`: refused request lines, timeouts); they may quote the raw
        request line, so query strings are cut out."""
        if self.hub.log:
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {_QUERY.sub('', format % args)}\n")


def serve(
    root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, token: str | None = None, **options
) -> HubServer:
    """A `HubServer` bound to `host:port` (0: a free port, see ``.url``), not yet serving: call ``.start()``
    (background thread), ``.serve_forever()``, or use it as a context manager. `options`: see `HubServer`."""
    return HubServer(root, host, port, token, **options)
