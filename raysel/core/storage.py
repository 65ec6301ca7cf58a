"""Where a run's files live: a local folder, an s3:// or gs:// prefix, or any fsspec location, all
through one pyarrow filesystem, so every stage reads and writes the same way."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import pyarrow.fs as pafs
import tenacity
from pydantic import Field, SecretStr

from raysel.core.section import ConfigError, Section

# What passes: throttling, a 5xx, a dropped or refused connection, a timeout (pyarrow's S3 errors
# carry the AWS error name, or curl's code and the HTTP status). A 403, a missing key or bucket, a bad
# signature do not pass by waiting.
TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|SLOW_DOWN|THROTTL|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIME_?OUT|"
    r"HTTP status (5\d\d|429)|curlCode|[Cc]onnection (reset|refused|aborted)|[Tt]imed out|[Tt]imeout"
)


def transient(err: BaseException) -> bool:
    return (
        isinstance(err, OSError)
        and not isinstance(err, (FileNotFoundError, PermissionError))
        and bool(TRANSIENT.search(str(err)))
    )


class S3Config(Section):
    """Settings for every s3:// location, input and output alike. Credentials
    fall back to the standard AWS environment variables."""

    endpoint_override: str | None = None
    """`host:port` of an S3-compatible store (SeaweedFS, MinIO, R2, …)"""
    scheme: Literal["https", "http"] = "https"
    """`https` or `http`"""
    region: str | None = None
    """the bucket's region"""
    access_key: SecretStr | None = None
    """falls back to `AWS_ACCESS_KEY_ID`; never written to manifests or logs"""
    secret_key: SecretStr | None = None
    """falls back to `AWS_SECRET_ACCESS_KEY`; never written to manifests or logs"""
    max_attempts: int = Field(5, gt=0)
    """attempts per S3 request (AWS standard retry strategy)"""
    connect_timeout: float = Field(5.0, gt=0)
    """seconds to wait for a connection: a wrong endpoint fails fast"""
    outage_seconds: float = Field(120.0, ge=0)
    """how long an encode shard's reads and writes retry through a transient S3 failure (throttling, 5xx, dropped
    connections, timeouts; jittered backoff); the run stops at the first shard past it (a re-run resumes). A 403
    or a missing key fails at once"""


log = logging.getLogger(__name__)
T = TypeVar("T")


def filesystem_for(uri: str, s3: S3Config) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `uri`, and the path of `uri` inside it: a local path, s3:// (pyarrow,
    with the s3 section), gs:// (pyarrow's GCS client, Google's default credentials), or any other
    scheme fsspec knows where its package is installed: abfs:// and az:// (adlfs), hf:// (huggingface_hub),
    file://... Credentials for these come from their own environment, never from the config."""
    if uri.startswith("s3://"):
        return s3_filesystem(s3), uri.removeprefix("s3://").rstrip("/")
    if uri.startswith(("gs://", "gcs://")):
        return pafs.GcsFileSystem(), uri.split("://", 1)[1].rstrip("/")
    if "://" in uri:
        return fsspec_filesystem(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def is_remote(uri: str) -> bool:
    """Object stores, whose errors can be transient; a local folder's (and file://) are not."""
    return "://" in uri and not uri.startswith("file://")


def fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as err:  # an unknown scheme, or its package is not installed
        raise ConfigError(
            f"unsupported location {uri!r}: {err} (supported: a local path, s3://, gs://, and any fsspec "
            f"scheme whose package is installed, e.g. abfs:// with adlfs, hf:// with huggingface_hub)"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(uri).rstrip("/")


def s3_filesystem(s3: S3Config) -> pafs.S3FileSystem:
    secret = lambda v: v.get_secret_value() if v is not None else None  # noqa: E731
    return pafs.S3FileSystem(
        access_key=secret(s3.access_key),
        secret_key=secret(s3.secret_key),
        region=s3.region,
        scheme=s3.scheme,
        endpoint_override=s3.endpoint_override,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
        connect_timeout=s3.connect_timeout,
    )


class StorageError(RuntimeError):
    """The output root cannot be reached or used; the message names its URI, never the keys."""


# The secrets other filesystems read from the environment; an error message never shows them.
SECRET_ENV = ("HF_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_CLIENT_SECRET", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # fmt: skip


def redact(message: str, s3: S3Config) -> str:
    secrets = [k.get_secret_value() for k in (s3.access_key, s3.secret_key) if k is not None]
    for value in secrets + [os.environ.get(name, "") for name in SECRET_ENV]:
        if value:
            message = message.replace(value, "<secret>")
    return message


class Storage:
    """A run's output root. Paths given to it are relative to the root."""

    def __init__(self, root: str, s3: S3Config):
        self.root = root.rstrip("/")
        self.s3 = s3
        self.fs, self.base = filesystem_for(root, s3)

    def check(self) -> None:
        """Fail fast, before any work, when the root's bucket is missing or refuses these credentials.
        Reads only: a run that cannot write must leave nothing behind."""
        bucket = self.base.split("/")[0] if self.root.startswith("s3://") else None
        try:
            if bucket and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"output root {self.root}: bucket {bucket!r} does not exist")
            self.fs.get_file_info(self.base)
        except OSError as err:
            raise StorageError(f"output root {self.root}: {redact(str(err), self.s3)}") from None

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def child(self, name: str) -> Storage:
        """The root of a side set kept inside this one (<root>/<name>/), with the same settings."""
        return Storage(self.uri(name), self.s3)

    def uri(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_json(self, rel: str) -> dict | None:
        """The JSON at `rel`, or None where there is none; through a transient S3 failure (retrying): a run
        resumed just after its store came back reads its markers first, and one 500 must not end it."""

        def read() -> dict | None:
            if not self.exists(rel):
                return None
            with self.fs.open_input_stream(self.path(rel)) as f:
                return json.loads(f.read())

        return self.retrying(f"reading {rel}", read)

    def write_json(self, rel: str, obj: dict) -> None:
        # A reader sees the old file or the new one, never half of one; markers rely on this.
        # On S3 one put is atomic; a local file is written aside and renamed over.
        path = self.path(rel)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        aside = f"{path}.{os.getpid()}.tmp" if isinstance(self.fs, pafs.LocalFileSystem) else path
        with self.fs.open_output_stream(aside) as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
        if aside != path:
            self.fs.move(aside, path)

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), retried with jittered backoff while S3 fails in a way that passes (transient) for up to
        s3.outage_seconds; any other error (a 403, a missing key) at once. Either way a StorageError
        naming `what` and the root. A local folder's errors are not transient: they raise as they are."""
        if not is_remote(self.root):
            return fn()
        start = time.monotonic()

        def warn(state: tenacity.RetryCallState) -> None:
            log.warning("%s at %s: %s; retrying in %.1fs", what, self.root,
                        redact(str(state.outcome.exception()), self.s3), state.upcoming_sleep)  # fmt: skip

        try:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(transient),
                wait=tenacity.wait_exponential_jitter(initial=1, max=30),
                stop=tenacity.stop_before_delay(self.s3.outage_seconds),
                before_sleep=warn,
                reraise=True,
            ):
                with attempt:
                    return fn()
        except OSError as err:
            seconds = f" for {time.monotonic() - start:.0f}s (s3.outage_seconds)" if transient(err) else ""
            raise StorageError(f"{what} at {self.root} failed{seconds}: {redact(str(err), self.s3)}") from None

    def read_files(self, infos: list[pafs.FileInfo]) -> list[bytes]:
        """Small files' bytes, 32 reads at a time: on S3 each is a GET whose latency, not its size,
        counts (a 10M-row store has thousands of shard markers)."""

        def read(info: pafs.FileInfo) -> bytes:
            with self.fs.open_input_stream(info.path) as f:
                return f.read()

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            return list(pool.map(read, infos))

    def listing(self, rel: str) -> list[pafs.FileInfo]:
        """The files directly under a folder of the root; none when it does not exist."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.is_file]

    def remove(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))
