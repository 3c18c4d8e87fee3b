"""Where a run reads and writes: local directories and object-store URLs (gs://bucket/run) alike,
through etils.epath, the path type Orbax itself uses (fsspec/gcsfs behind a URL, or tf.io.gfile
where TensorFlow is installed). Every file the job writes under its workdir goes through here.

Object stores have no append and no rename of a half-written file, so the two operations that
rely on them are written once here: `LineAppender` appends to a local file and rewrites the object
of a URL (from the text it keeps: the object is read once); `write_atomically` renames a temporary
file locally, where a URL's object is replaced whole by the store when its write completes.
"""
from __future__ import annotations

import os
import uuid

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://...' paths (gs://, s3://, memory://), False for local ones."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """An absolute local path (relative to the working directory), or the URL as it is."""
    text = os.fspath(path)
    return epath.Path(text) if is_url(text) else epath.Path(os.path.abspath(text))


class LineAppender:
    """Adds lines (each ending in a newline) to one text file, creating it if needed. A local file is
    opened in append mode; a URL's object is rewritten whole from the text kept here, read from the
    store once, at the first line (after whatever the run did to the file before)."""

    def __init__(self, path: epath.Path):
        self.path, self._text = path, None

    def append(self, line: str) -> None:
        if not is_url(self.path):
            with open(self.path, "a") as f:
                f.write(line)
            return
        if self._text is None:
            self._text = self.path.read_text() if self.path.exists() else ""
        self._text += line
        self.path.write_text(self._text)


def write_atomically(path: epath.Path, text: str) -> None:
    """Replace a text file so that a reader (or a kill) never sees half of it."""
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex[:8]}.tmp"  # two writers never share a temporary
    tmp.write_text(text)
    os.replace(tmp, path)
