"""A Cloud Storage emulator (gcp-storage-emulator, served from this process) that keeps the object
generation rules tensorstore's OCDBT driver (Orbax's array store) relies on and the emulator leaves out:
a request carrying ifGenerationMatch (a multipart upload too, whose body names the object) fails with
412 when the object's generation differs (0: the object must not exist), a download whose
ifGenerationNotMatch holds answers 304, and a download names its generation in x-goog-generation.
Without the first, concurrent writers of one manifest.ocdbt all "win" and the checkpoint is corrupt
("Malformed StorageGeneration"), and the workdir lock's exclusive create never refuses.
https://cloud.google.com/storage/docs/request-preconditions"""
import contextlib
import io
import json
import re
from collections.abc import Iterator
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlparse

from gcp_storage_emulator import server as _server
from gcp_storage_emulator.exceptions import NotFound

from tests.faults import cli

_OBJECT = re.compile(r"/b/(?P<bucket>[-.\w]+)/o(?:/(?P<name>[^/]+))?$")


def _multipart_name(handler) -> str | None:
    """The object name of a multipart upload (gcsfs's small writes), read from the JSON part of its
    body; the body is put back for the emulator to read."""
    body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    handler.rfile = io.BytesIO(body)
    match = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    return json.loads(b'"' + match[1] + b'"') if match else None


def _generation(handler) -> tuple[str | None, dict]:
    """The addressed object's current generation ("0" if absent; None: not an object request) and the
    request's query."""
    url = urlparse(handler.path)
    query = parse_qs(url.query)
    match = _OBJECT.search(url.path)
    name = match and (match["name"] or query.get("name", [None])[0])
    if match and not name and query.get("uploadType") == ["multipart"]:
        name = _multipart_name(handler)
    if not name:
        return None, query
    try:
        return str(handler.storage.get_file_obj(match["bucket"], unquote(name))["generation"]), query
    except NotFound:
        return "0", query


class _Router(_server.Router):
    def handle(self, method):
        handler = self._request_handler
        generation, query = _generation(handler)
        handler.generation = generation if method == "GET" and query.get("alt") == ["media"] else None
        refusal = None
        if generation is not None and query.get("ifGenerationMatch", [generation])[0] != generation:
            refusal = HTTPStatus.PRECONDITION_FAILED
        elif generation is not None and method == "GET" and query.get("ifGenerationNotMatch") == [generation]:
            refusal = HTTPStatus.NOT_MODIFIED
        if refusal is None:
            return super().handle(method)
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))  # the unread upload body
        handler.send_response(refusal.value, refusal.phrase)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


class _Response(_server.Response):
    def close(self):
        if getattr(self._handler, "generation", None) and self.status == HTTPStatus.OK:
            self["x-goog-generation"] = self._handler.generation
        super().close()


@contextlib.contextmanager
def serving(bucket: str) -> Iterator[str]:
    """An in-memory emulator holding `bucket`, with the generation rules; yields its URL."""
    saved = _server.Router, _server.Response
    _server.Router, _server.Response = _Router, _Response
    port = cli.free_port()
    emulator = _server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        emulator.stop()
        _server.Router, _server.Response = saved
