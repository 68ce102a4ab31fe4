"""A local GCS server for the tests: the PyPI package gcp-storage-emulator (the real JSON API),
with one fix.

The emulator ignores generation preconditions: an upload with ifGenerationMatch=0 ("create
only if absent") or ifGenerationMatch=<generation> succeeds whatever the object's generation
is, where GCS answers 412 Precondition Failed; and a media download carries no
x-goog-generation header (GCS always sends it). Minimal reproduction (emulator on :9023):

    curl -X POST --data-binary x 'http://localhost:9023/upload/storage/v1/b/bkt/o?uploadType=media&name=o&ifGenerationMatch=0'
    curl -X POST --data-binary y 'http://localhost:9023/upload/storage/v1/b/bkt/o?uploadType=media&name=o&ifGenerationMatch=0'
    # both 200; GCS: the second is 412
    curl -D - 'http://localhost:9023/download/storage/v1/b/bkt/o/o?alt=media'
    # no x-goog-generation header

TensorStore's OCDBT (orbax's checkpoint format) reads its manifest back with the generation
of the download and commits it with conditional writes: without the header, a training run's
second checkpoint fails with `Error reading .../manifest.ocdbt: Malformed StorageGeneration`
(what the "pod storage" issue saw), and with preconditions ignored two commits in flight would
both "win". A lock object made with ifGenerationMatch=0 would not lock either. This module starts
the emulator with uploads, deletes and downloads checking ifGenerationMatch /
ifGenerationNotMatch as GCS does (412, or 304 for a download whose generation did not change)
and downloads sending x-goog-generation, which is what the code under test relies on; nothing
else is changed.

    python tests/gcs_emulator.py [PORT]   # serves until killed (the tests' fixture runs this)
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus


def _generation(storage, bucket: str, name: str) -> int:
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return 0  # GCS: generation 0 means "no live object"


def _precondition_failed(request, storage, bucket: str, name: str | None) -> bool:
  if name is None:
    return False
  query = request.query
  current = None
  if "ifGenerationMatch" in query:
    current = _generation(storage, bucket, name)
    if current != int(query["ifGenerationMatch"][0]):
      return True
  if "ifGenerationNotMatch" in query:
    current = _generation(storage, bucket, name) if current is None else current
    if current == int(query["ifGenerationNotMatch"][0]):
      return True
  return False


def _upload_name(request) -> str | None:
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict) and isinstance(data.get("meta"), dict):
    return data["meta"].get("name")
  return None


def install_preconditions() -> None:
  """Wrap the emulator's object insert and delete handlers with GCS's precondition checks."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  def checked(handler, name_of):
    def wrapper(request, response, storage, *args, **kwargs):
      bucket = request.params.get("bucket_name")
      if _precondition_failed(request, storage, bucket, name_of(request)):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return None
      return handler(request, response, storage, *args, **kwargs)
    return wrapper

  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params.get("bucket_name"), request.params.get("object_id")
    generation = _generation(storage, bucket, name)
    query = request.query
    if generation and "ifGenerationNotMatch" in query and (
        generation == int(query["ifGenerationNotMatch"][0])):
      response.status = HTTPStatus.NOT_MODIFIED
      response["x-goog-generation"] = str(generation)
      response.write_file(b"")
      return None
    if generation and "ifGenerationMatch" in query and (
        generation != int(query["ifGenerationMatch"][0])):
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "Precondition Failed"}})
      return None
    if generation:
      obj = storage.get_file_obj(bucket, name)
      response["x-goog-generation"] = str(generation)
      response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
      response["x-goog-stored-content-length"] = str(obj.get("size", ""))
    return objects_download(request, response, storage, *args, **kwargs)

  objects_download = objects.download
  wrapped = {
      objects.insert: checked(objects.insert, _upload_name),
      objects.delete: checked(objects.delete, lambda r: r.params.get("object_id")),
      objects.download: download,
  }
  objects.insert = wrapped[objects.insert]
  objects.download = download  # also what objects.get calls for ?alt=media
  server.HANDLERS = tuple((regex, {method: wrapped.get(fn, fn) for method, fn in table.items()})
                          for regex, table in server.HANDLERS)


def serve(port: int) -> None:
  """Serve on localhost:`port` (0: a free port the system picks); print "ready PORT" once
  listening."""
  install_preconditions()
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  srv = create_server("localhost", port, in_memory=True)
  srv.start()
  port = srv._api._httpd.server_address[1]  # pylint: disable=protected-access
  print(f"ready {port}", flush=True)
  try:
    while True:
      time.sleep(1)
  finally:
    srv.stop()


if __name__ == "__main__":
  serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
