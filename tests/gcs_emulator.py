"""A local GCS server for the tests: the PyPI package gcp-storage-emulator (the real JSON API),
with GCS's request preconditions and generation headers added.

The emulator ignores request preconditions: an upload with ifGenerationMatch=0 ("create only if
absent") or ifGenerationMatch=<generation> succeeds whatever the object's generation is, where
GCS answers 412 Precondition Failed; and a media download carries no x-goog-generation header
(GCS always sends it). Minimal reproduction (emulator on :9023):

    curl -X POST --data-binary x 'http://localhost:9023/upload/storage/v1/b/bkt/o?uploadType=media&name=o&ifGenerationMatch=0'
    curl -X POST --data-binary y 'http://localhost:9023/upload/storage/v1/b/bkt/o?uploadType=media&name=o&ifGenerationMatch=0'
    # both 200; GCS: the second is 412
    curl -D - 'http://localhost:9023/download/storage/v1/b/bkt/o/o?alt=media'
    # no x-goog-generation header

TensorStore's OCDBT (orbax's checkpoint format) reads its manifest back with the generation
of the download and commits it with conditional writes: without the header, a training run's
second checkpoint fails with `Error reading .../manifest.ocdbt: Malformed StorageGeneration`
(what the "pod storage" issue saw), and with preconditions ignored two commits in flight would
both "win". A lock object made with ifGenerationMatch=0 would not lock either.

This module wraps the emulator's object handlers so that every request that reads, writes or
deletes an object (uploads, deletes, metadata GETs incl. alt=json, media downloads, metadata
patches) checks the four preconditions of GCS's JSON API as GCS documents them
(https://cloud.google.com/storage/docs/request-preconditions and the objects reference):

  ifGenerationMatch         "Request proceeds if the generation of the target resource matches
                            the value used in the precondition. If the values don't match, the
                            request fails with a 412 Precondition Failed response." 0 matches
                            an absent object ("no live versions").
  ifMetagenerationMatch     the same for the metageneration (412).
  ifGenerationNotMatch      "Request proceeds if the generation of the target resource does not
                            match the value used in the precondition. If the values match, the
                            request fails with a 304 Not Modified response." and "If no live
                            object exists, the precondition fails" (412).
  ifMetagenerationNotMatch  the same for the metageneration (304; 412 without a live object).

A 412 wins over a 304 when several fail. A read or delete of an object that does not exist stays
the emulator's 404. Downloads (and their 304s) carry x-goog-generation, x-goog-metageneration
and x-goog-stored-content-length. Nothing else is changed (tests/test_gcs_emulator.py checks each rule).

    python tests/gcs_emulator.py [PORT]   # serves until killed (the tests' fixture runs this)
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus

PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch",
                 "ifMetagenerationNotMatch")


def _live(storage, bucket: str, name: str | None) -> dict | None:
  """The live object's metadata, or None (GCS: generation 0 means "no live object")."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  if name is None:
    return None
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def precondition_status(query: dict, obj: dict | None) -> HTTPStatus | None:
  """What GCS answers to a request with `query`'s preconditions on the live object `obj` (None:
  no live object): 412, 304, or None when the request proceeds."""
  def value(name):
    return int(query[name][0])
  generation = int(obj["generation"]) if obj else 0
  metageneration = int(obj.get("metageneration", 1)) if obj else 0
  not_modified = False
  if "ifGenerationMatch" in query and generation != value("ifGenerationMatch"):
    return HTTPStatus.PRECONDITION_FAILED
  if "ifMetagenerationMatch" in query and (
      obj is None or metageneration != value("ifMetagenerationMatch")):
    return HTTPStatus.PRECONDITION_FAILED
  for name, current in (("ifGenerationNotMatch", generation),
                        ("ifMetagenerationNotMatch", metageneration)):
    if name in query:
      if obj is None:
        return HTTPStatus.PRECONDITION_FAILED
      not_modified |= current == value(name)
  return HTTPStatus.NOT_MODIFIED if not_modified else None


def _upload_name(request) -> str | None:
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict) and isinstance(data.get("meta"), dict):
    return data["meta"].get("name")
  return None


def _generation_headers(response, obj: dict) -> None:
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  response["x-goog-stored-content-length"] = str(obj.get("size", ""))


def _refuse(response, status: HTTPStatus, obj: dict | None) -> None:
  response.status = status
  if status == HTTPStatus.PRECONDITION_FAILED:
    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
  else:  # 304: no body
    if obj is not None:
      _generation_headers(response, obj)
    response.write_file(b"")


def install_preconditions() -> None:
  """Wrap the emulator's object handlers with GCS's precondition checks and headers."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  def checked(handler, name_of, *, absent_is_404: bool):
    """`handler` behind the preconditions; a missing object is the handler's own 404 where
    `absent_is_404` (reads, deletes, patches), else (uploads) generation 0."""
    def wrapper(request, response, storage, *args, **kwargs):
      if any(p in request.query for p in PRECONDITIONS):
        obj = _live(storage, request.params.get("bucket_name"), name_of(request))
        if obj is not None or not absent_is_404:
          status = precondition_status(request.query, obj)
          if status is not None:
            return _refuse(response, status, obj)
      return handler(request, response, storage, *args, **kwargs)
    return wrapper

  object_name = lambda r: r.params.get("object_id")
  original_download, original_get = objects.download, objects.get

  def download(request, response, storage, *args, **kwargs):
    obj = _live(storage, request.params.get("bucket_name"), object_name(request))
    if obj is not None:
      _generation_headers(response, obj)
    return original_download(request, response, storage, *args, **kwargs)

  def get(request, response, storage, *args, **kwargs):
    if request.query.get("alt", [""])[0] == "media":  # original_get calls `download`
      return original_get(request, response, storage, *args, **kwargs)
    return checked_get(request, response, storage, *args, **kwargs)

  checked_download = checked(download, object_name, absent_is_404=True)
  checked_get = checked(original_get, object_name, absent_is_404=True)
  wrapped = {
      objects.insert: checked(objects.insert, _upload_name, absent_is_404=False),
      objects.delete: checked(objects.delete, object_name, absent_is_404=True),
      objects.patch: checked(objects.patch, object_name, absent_is_404=True),
      objects.download: checked_download,
      objects.get: get,
  }
  objects.insert = wrapped[objects.insert]
  objects.download = checked_download  # what objects.get calls for ?alt=media
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
