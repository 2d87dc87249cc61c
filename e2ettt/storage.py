"""Where a sweep keeps what must outlive its nodes: a local directory or any pyarrow filesystem URI.

`Store("runs")`, `Store("s3://bucket/prefix")`, `Store("gs://bucket/prefix")`:
relative keys under one root, read and written as whole objects. Local
writes go to a temporary file renamed into place; object stores replace an
object whole on PUT. Nothing here knows about Ray: the sweep driver is the
only writer, so no node ever reads a path another node wrote.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    """A storage URI that cannot be opened or written; the message names it."""


class Store:
    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        try:
            if "://" in uri:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        except (OSError, ValueError) as exc:  # pyarrow: unknown scheme, bad bucket name, no credentials
            raise StorageError(f"--storage {uri}: cannot open ({str(exc).splitlines()[0]})") from None
        self.uri = uri.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def url(self, key: str) -> str:
        """What Ray Tune/Train take as `storage_path` for `key`: a path, or the URI with the key appended."""
        return str(Path(self.root) / key) if self.local else f"{self.uri}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        path = self._path(key)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        parent = path.rsplit("/", 1)[0]
        try:
            self.fs.create_dir(parent, recursive=True)
            if self.local:
                tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp{os.getpid()}"
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
        except OSError as exc:
            raise StorageError(f"{self.url(key)}: cannot write ({str(exc).splitlines()[0]})") from None

    def list(self, prefix: str) -> list[str]:
        """Names of the objects directly under `prefix` (empty when there is none)."""
        selector = pafs.FileSelector(self._path(prefix), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass
