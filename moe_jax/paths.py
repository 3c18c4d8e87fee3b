"""Where a run reads and writes: local directories and object-store URLs (gs://bucket/run) alike,
through etils.epath, the path type Orbax itself uses (fsspec/gcsfs behind a URL, or tf.io.gfile
where TensorFlow is installed). Every file the job writes under its workdir goes through here.

Object stores have no append and no rename of a half-written file, so the two operations that
rely on them are written once here: `append_line` appends to a local file and rewrites the object
of a URL; `write_atomically` renames a temporary file locally, where a URL's object is replaced
whole by the store when its write completes.
"""
from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://...' paths (gs://, s3://, memory://), False for local ones."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """An absolute local path (relative to the working directory), or the URL as it is."""
    text = os.fspath(path)
    return epath.Path(text) if is_url(text) else epath.Path(os.path.abspath(text))


def append_line(path: epath.Path, line: str) -> None:
    """Add one line (ending in a newline) to a text file, creating it if needed."""
    if is_url(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + line)
    else:
        with open(path, "a") as f:
            f.write(line)


def write_atomically(path: epath.Path, text: str) -> None:
    """Replace a text file so that a reader (or a kill) never sees half of it."""
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
