"""Where a cache lives: a local directory or any pyarrow file system URI (file://, s3://, gs://, ...).

Writes are atomic per file: the bytes go to a hidden temporary name beside the target, which is then
moved onto it (a rename on local and POSIX file systems; object stores publish an object only once its
upload completes). Hidden names start with "." so pyarrow/datasets readers of the shard folder skip them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = ["CacheLocation"]


class CacheLocation:
    """A cache root on a pyarrow file system. Relative paths below use "/" separators."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        if "://" in self.uri:
            fs, root = pafs.FileSystem.from_uri(self.uri)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(self.uri))
        self.fs: pafs.FileSystem = fs
        self.root = root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"CacheLocation({self.uri!r})"

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def display(self, rel: str = "") -> str:
        """A path for messages: the URI as the user gave it, joined with `rel`."""
        return self.uri.rstrip("/") + ("/" + rel if rel else "")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> int | None:
        info = self.fs.get_file_info(self.path(rel))
        return int(info.size) if info.type == pafs.FileType.File else None

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return bytes(f.read())

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def listdir(self, rel: str) -> list[str]:
        """Names of the files directly in folder `rel` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File)

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def write_atomic(self, rel: str, data: bytes | pa.Buffer) -> None:
        """Write `data` to `rel` through a hidden temporary file and a move."""
        folder, name = posixpath.split(rel)
        tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with self.fs.open_output_stream(self.path(tmp)) as f:
                f.write(data)
            self.fs.move(self.path(tmp), self.path(rel))
        except BaseException:
            with contextlib.suppress(OSError):  # best effort; the original error is what matters
                self.delete(tmp)
            raise

    def remove_temporaries(self, rel: str) -> list[str]:
        """Delete the hidden temporary files an interrupted writer left in folder `rel`; returns their names."""
        gone = [n for n in self.listdir(rel) if n.startswith(".") and ".tmp-" in n]
        for n in gone:
            self.delete(posixpath.join(rel, n))
        return gone
