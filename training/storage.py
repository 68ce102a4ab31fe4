"""Objects on gs:// through TensorStore's GCS driver (what orbax writes checkpoints with): the
few operations the rest of training needs beyond etils.epath, with errors as one sentence.

    check_remote("gs://bucket/run", "--workdir")   # a probe object written and deleted
    gen = create_exclusive("gs://b/run/run.lock", b"...")   # None if it exists already
    data = read_range("gs://b/data/train.bin", start, stop)  # one ranged GET
    upload(local_path, "gs://b/data/train.bin")

GCS is reached as TensorStore reaches it: its default endpoint, or TENSORSTORE_GCS_HTTP_URL
(an emulator; the tests set it), with Google's application default credentials.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from model.errors import UserError

# TensorStore's StorageGeneration "no value" (what a read of a missing key reports): as a write
# condition, "only if the object does not exist" (ifGenerationMatch=0). b"" would mean
# "unconditional".
NO_VALUE = b"\x02"
# Seconds a probe may take before the endpoint counts as unreachable.
PROBE_TIMEOUT = 30


def is_remote(path: Any) -> bool:
  return "://" in os.fspath(path)


def split_gs(path: str) -> tuple[str, str]:
  """("bucket", "key/prefix") of gs://bucket/key/prefix; UserError for other schemes."""
  text = os.fspath(path)
  if not text.startswith("gs://"):
    raise UserError(f"{text!r}: only gs:// remote paths are supported.")
  bucket, _, key = text[len("gs://"):].partition("/")
  if len(bucket) < 3:
    raise UserError(f"{text!r} names no bucket (gs://BUCKET/path; bucket names have at least "
                    f"3 characters).")
  return bucket, key.strip("/")


@functools.lru_cache(maxsize=None)
def _kvstore(bucket: str, retries: int | None = None):
  """One TensorStore GCS store per bucket (and retry policy), opened once: a batch's ranged
  reads reuse its connections instead of opening a store per call."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  spec: dict[str, Any] = {"driver": "gcs", "bucket": bucket}
  if retries is not None:  # fail fast (the probe): TensorStore retries for minutes by default
    spec["context"] = {"gcs_request_retries": {"max_retries": retries, "initial_delay": "0.2s",
                                               "max_delay": "2s"}}
  return ts.KvStore.open(spec).result()


def _reason(e: BaseException, path: str) -> str:
  text = str(e)
  low = text.lower()
  if "404" in text or "not found" in low and "bucket" in low:
    bucket = split_gs(path)[0]
    return f"the bucket {bucket!r} does not exist (or is not visible to these credentials)"
  if any(s in low for s in ("401", "403", "permission", "credential", "unauthorized",
                            "forbidden")):
    return "the credentials cannot write there (gcloud auth application-default login, or " \
           "GOOGLE_APPLICATION_CREDENTIALS)"
  if any(s in low for s in ("connect", "resolve", "timeout", "timed out", "unavailable",
                            "deadline")):
    endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "https://storage.googleapis.com")
    return f"the storage endpoint {endpoint} cannot be reached"
  return text.splitlines()[0][:200] if text else type(e).__name__


def _result(future, path: str, what: str, timeout: float | None = None):
  try:
    return future.result(timeout=timeout)
  except TimeoutError:
    endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "https://storage.googleapis.com")
    raise UserError(f"{what} {path!r} cannot be used: the storage endpoint {endpoint} did not "
                    f"answer within {timeout:.0f} s.") from None
  except Exception as e:  # pylint: disable=broad-except  (tensorstore raises ValueError etc.)
    raise UserError(f"{what} {path!r} cannot be used: {_reason(e, path)}.") from None


def check_remote(path: str, what: str = "--workdir") -> None:
  """Write and delete a probe object under `path`; UserError naming the path and why not (a
  missing bucket, no credentials, an unreachable endpoint), before anything is compiled."""
  bucket, key = split_gs(path)
  kv = _kvstore(bucket, retries=3)
  probe = f"{key}/.write-test-{os.getpid()}".lstrip("/")
  _result(kv.write(probe, b"x"), path, what, PROBE_TIMEOUT)
  _result(kv.write(probe, None), path, what, PROBE_TIMEOUT)


def create_exclusive(path: str, data: bytes) -> bytes | None:
  """Create the object `path` only if it does not exist (a generation-0 precondition: of two
  racing creators exactly one wins); its generation, or None if it existed already."""
  bucket, key = split_gs(path)
  stamp = _result(_kvstore(bucket).write(key, data, if_equal=NO_VALUE), path, "The lock")
  return stamp.generation or None  # b"": the condition failed


def delete_if(path: str, generation: bytes) -> bool:
  """Delete `path` if it is still the object of `generation`; whether it was deleted."""
  bucket, key = split_gs(path)
  stamp = _result(_kvstore(bucket).write(key, None, if_equal=generation), path, "The lock")
  return bool(stamp.generation)  # b"": it was another generation


def read(path: str) -> bytes | None:
  bucket, key = split_gs(path)
  result = _result(_kvstore(bucket).read(key), path, "The object")
  return None if result.state == "missing" else bytes(result.value)


def read_range(path: str, start: int, stop: int) -> bytes:
  """Bytes [start, stop) of the object `path`: one ranged read."""
  return read_ranges(path, [(start, stop)])[0]


def read_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
  """Several ranges of one object, read concurrently."""
  bucket, key = split_gs(path)
  kv = _kvstore(bucket)
  futures = [kv.read(key, byte_range=slice(a, b)) for a, b in ranges]
  return [bytes(_result(f, path, "The data file").value) for f in futures]


def size(path: str) -> int | None:
  """The size in bytes of the object `path`, None if it does not exist (a metadata request
  through etils.epath)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  p = epath.Path(path)
  return p.stat().length if p.exists() else None


def forget_listings() -> None:
  """Drop gcsfs's in-process cache of folder listings (etils.epath lists gs:// through gcsfs),
  so that objects another process wrote since are seen."""
  import sys  # pylint: disable=import-outside-toplevel
  if "gcsfs" in sys.modules:
    import fsspec  # pylint: disable=import-outside-toplevel
    # The instance etils.epath uses (fsspec caches one per set of arguments).
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()


def write(path: str, data: bytes) -> bytes:
  """Write the object `path` (unconditionally); its generation."""
  bucket, key = split_gs(path)
  return _result(_kvstore(bucket).write(key, data), path, "The object").generation


def upload(local: str | os.PathLike, path: str) -> None:
  """Copy a local file to `path`, streamed (a resumable upload through gcsfs)."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  split_gs(path)
  try:
    gcsfs.GCSFileSystem().put_file(os.fspath(local), path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"Uploading {os.fspath(local)!r} to {path!r} failed: {_reason(e, path)}."
                    ) from None
