"""A multipart upload (POST /v1/files), streamed straight into a file on disk.

The body is parsed as it arrives: the file part's bytes go to a temporary
file beside where the upload will live, never to memory nor to a second copy
in /tmp, and the upload is refused (413) as soon as it passes the size limit,
not once it has all been read.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from lmq.api.app.openai.common import OpenAIError
from lmq.core.utf8 import NotUtf8, Utf8Check

FIELD_BYTES = 1024  # a form field other than the file (purpose) is a short word


@dataclass
class Upload:
    path: Path  # the temporary file holding the file part's bytes
    filename: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)


class _Parts:
    """The parser's callbacks: collect each part's headers, write the file part, keep the other fields."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self._file = None
        self._header_field = self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self):
        self._headers, self._name, self._value = {}, None, bytearray()

    def header_field(self, data, start, end):
        self._header_field += data[start:end]

    def header_value(self, data, start, end):
        self._header_value += data[start:end]

    def header_end(self):
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None and self._name == "file":
            if self.upload is not None:
                raise OpenAIError(400, "send one file per upload", param="file", code="invalid_request")
            path = self.directory / f".upload-{secrets.token_hex(8)}"
            self._file = path.open("wb")
            self._utf8 = Utf8Check("the file")
            self.upload = Upload(path, printable_name(filename), 0)

    def part_data(self, data, start, end):
        if self._file is not None:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise OpenAIError(
                    413,
                    f"the file is larger than this server's limit of {self.max_bytes} bytes (LMQ_MAX_FILE_BYTES)",
                    param="file",
                    code="file_too_large",
                )
            self._checked(data[start:end])
            self._file.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > FIELD_BYTES:
                raise OpenAIError(
                    400, f"form field {self._name!r} is too long", param=self._name, code="invalid_request"
                )

    def _checked(self, data: bytes, final: bool = False) -> None:
        """A Batch file is JSONL, so UTF-8 (lmq.core.utf8): refused as a whole at its first other byte."""
        try:
            self._utf8.feed(data, final)
        except NotUtf8 as error:
            raise OpenAIError(400, str(error), param="file", code="invalid_file_encoding") from None

    def part_end(self):
        if self._file is not None:
            self._checked(b"", final=True)
            self._file.close()
            self._file = None
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def discard(self):
        if self._file is not None:
            self._file.close()
        if self.upload is not None:
            self.upload.path.unlink(missing_ok=True)


def printable_name(filename: bytes) -> str:
    """The client's file name as a label: its last part, without control characters (SQL refuses NUL)."""
    name = Path(filename.decode("utf-8", "replace")).name
    return "".join(c for c in name if c.isprintable())[:256] or "upload"


async def receive_upload(request: Request, directory: Path, max_bytes: int) -> Upload:
    """The request's file part on disk (in `directory`) and its other form fields; an OpenAIError for a bad body."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise OpenAIError(400, "send the file as multipart/form-data", code="invalid_request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise OpenAIError(
            413, f"the file is larger than this server's limit of {max_bytes} bytes", code="file_too_large"
        )
    directory.mkdir(parents=True, exist_ok=True)
    parts = _Parts(directory, max_bytes)
    parser = MultipartParser(options[b"boundary"], parts.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        parts.discard()
        raise OpenAIError(400, f"the multipart body does not parse: {error}", code="invalid_request") from None
    except BaseException:
        parts.discard()
        raise
    if parts.upload is None:
        raise OpenAIError(400, "the upload has no 'file' part", param="file", code="invalid_request")
    if parts._file is not None:  # the body ended inside the file part
        parts.discard()
        raise OpenAIError(400, "the multipart body ended inside the file", param="file", code="invalid_request")
    parts.upload.fields = parts.fields
    return parts.upload
