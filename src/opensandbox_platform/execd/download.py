"""A file download's response, shared by the sandbox's files API and an isolated session's: the
whole file or one `Range`, small files from memory, larger ones with sendfile."""

from __future__ import annotations

import os
from typing import BinaryIO

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import AnyResponse, FileResponse, Response
from opensandbox_platform.execd import files

SMALL_FILE = 256 * 1024  # sendfile's set-up costs more than copying a smaller file through memory


def file_response(fh: BinaryIO, st: os.stat_result, full: str, range_header: str | None) -> AnyResponse:
    """The response for open file `fh` (stat `st`, path `full`), closing it on every path."""
    size = st.st_size
    name = os.path.basename(full).replace('"', "_").replace("\r", "_").replace("\n", "_")
    headers = {
        "content-type": "application/octet-stream",
        "content-disposition": f'attachment; filename="{name}"',
        "accept-ranges": "bytes",
    }
    span: tuple[int, int] | None = None
    if range_header:
        try:
            span = files.parse_range(range_header, size)
        except files.RangeNotSatisfiable:
            fh.close()
            raise ApiError(
                416,
                errors.RANGE_NOT_SATISFIABLE,
                f"range {range_header!r} is outside the file ({size} bytes)",
                {"content-range": f"bytes */{size}"},
            ) from None
    status, start, count = 200, 0, size
    if span is not None:
        status, start, count = 206, span[0], span[1] - span[0] + 1
        headers["content-range"] = f"bytes {span[0]}-{span[1]}/{size}"
    if count <= SMALL_FILE:
        with fh:
            fh.seek(start)
            return Response(fh.read(count), status, headers)
    return FileResponse(fh, start, count, status, headers)
