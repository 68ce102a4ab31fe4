"""tests/gcs_emulator.py answers requests with preconditions as GCS documents them
(https://cloud.google.com/storage/docs/request-preconditions; the JSON API's object
parameters), through its JSON API on a local port, as TensorStore and gcsfs send them."""

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.xdist_group("gcs")  # one emulator per worker; the gs:// tests' one


def _request(gcs, method: str, path: str, data: bytes | None = None, headers=None, **query):
  """(status, headers, body) of one request to the emulator."""
  url = f"{gcs.url}{path}"
  if query:
    url += "?" + urllib.parse.urlencode(query)
  request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.status, response.headers, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, e.read()


def _upload(gcs, name: str, body: bytes, **query):
  return _request(gcs, "POST", f"/upload/storage/v1/b/{gcs.bucket}/o", body,
                  uploadType="media", name=name, **query)


def _object_path(gcs, name: str) -> str:
  return f"/storage/v1/b/{gcs.bucket}/o/{urllib.parse.quote(name, safe='')}"


def _metadata(gcs, name: str, **query):
  return _request(gcs, "GET", _object_path(gcs, name), alt="json", **query)


def _media(gcs, name: str, **query):
  return _request(gcs, "GET", f"/download{_object_path(gcs, name)}", alt="media", **query)


def _new_object(gcs, name: str, body: bytes = b"x") -> dict:
  """Create (or replace) `name`: its metadata (generation, metageneration)."""
  status, _, out = _upload(gcs, name, body)
  assert status == 200, out
  return json.loads(out)


def test_if_generation_match_zero_creates_only_if_absent(gcs):
  """"Setting to 0 makes the operation succeed only if there are no live versions of the
  object"; otherwise "the request fails with a 412 Precondition Failed response"."""
  name = "emulator/create-once"
  assert _upload(gcs, name, b"first", ifGenerationMatch=0)[0] == 200
  assert _upload(gcs, name, b"second", ifGenerationMatch=0)[0] == 412
  assert _media(gcs, name)[2] == b"first"


def test_metadata_gets_check_generation_preconditions(gcs):
  """alt=json GETs (TensorStore's zero-byte reads) obey ifGenerationMatch (412 when "the
  values don't match") and ifGenerationNotMatch (304 when "the values match")."""
  obj = _new_object(gcs, "emulator/read-json")
  gen = int(obj["generation"])
  assert _metadata(gcs, obj["name"], ifGenerationMatch=gen)[0] == 200
  assert _metadata(gcs, obj["name"], ifGenerationMatch=gen + 1)[0] == 412
  assert _metadata(gcs, obj["name"], ifGenerationNotMatch=gen + 1)[0] == 200
  status, headers, body = _metadata(gcs, obj["name"], ifGenerationNotMatch=gen)
  assert (status, body) == (304, b"")
  assert _media(gcs, obj["name"], ifGenerationNotMatch=gen)[0] == 304  # and media reads
  assert _media(gcs, obj["name"], ifGenerationMatch=gen + 1)[0] == 412


def test_downloads_carry_the_generation(gcs):
  """GCS sends x-goog-generation (and x-goog-metageneration) with every download, 304s too."""
  obj = _new_object(gcs, "emulator/headers", b"abc")
  status, headers, body = _media(gcs, obj["name"])
  assert (status, body) == (200, b"abc")
  assert headers["x-goog-generation"] == obj["generation"]
  assert headers["x-goog-metageneration"] == "1"
  status, headers, _ = _media(gcs, obj["name"], ifGenerationNotMatch=obj["generation"])
  assert status == 304 and headers["x-goog-generation"] == obj["generation"]


@pytest.mark.parametrize("precondition", ["ifGenerationNotMatch", "ifMetagenerationNotMatch"])
def test_not_match_on_an_absent_object_fails(gcs, precondition):
  """"If no live object exists, the precondition fails": an upload with either NotMatch
  precondition on a name with no object is refused (412) and creates nothing."""
  name = f"emulator/absent-{precondition}"
  assert _upload(gcs, name, b"x", **{precondition: 123})[0] == 412
  assert _metadata(gcs, name)[0] == 404
  assert _request(gcs, "DELETE", _object_path(gcs, name), ifGenerationNotMatch=1)[0] == 404


def test_a_matching_not_match_on_uploads_and_deletes_is_304(gcs):
  """ifGenerationNotMatch: "If the values match, the request fails with a 304 Not Modified
  response" — for an upload or a delete too (nothing changes)."""
  obj = _new_object(gcs, "emulator/not-modified", b"kept")
  gen = obj["generation"]
  assert _upload(gcs, obj["name"], b"new", ifGenerationNotMatch=gen)[0] == 304
  assert _request(gcs, "DELETE", _object_path(gcs, obj["name"]),
                  ifGenerationNotMatch=gen)[0] == 304
  status, _, body = _media(gcs, obj["name"])
  assert (status, body) == (200, b"kept")
  # Not matching: the request proceeds.
  assert _request(gcs, "DELETE", _object_path(gcs, obj["name"]),
                  ifGenerationNotMatch=int(gen) + 1)[0] in (200, 204)
  assert _metadata(gcs, obj["name"])[0] == 404


def test_metageneration_preconditions(gcs):
  """ifMetagenerationMatch: 412 when "the values don't match"; ifMetagenerationNotMatch: 304
  when they match. A metadata patch makes metageneration 2."""
  obj = _new_object(gcs, "emulator/metageneration")
  name = obj["name"]
  assert obj["metageneration"] == "1"
  assert _metadata(gcs, name, ifMetagenerationMatch=2)[0] == 412
  assert _metadata(gcs, name, ifMetagenerationNotMatch=1)[0] == 304
  assert _upload(gcs, name, b"y", ifMetagenerationMatch=2)[0] == 412
  patch = json.dumps({"metadata": {"k": "v"}}).encode()
  headers = {"Content-Type": "application/json"}
  assert _request(gcs, "PATCH", _object_path(gcs, name), patch, headers,
                  ifMetagenerationMatch=2)[0] == 412
  status, _, out = _request(gcs, "PATCH", _object_path(gcs, name), patch, headers,
                            ifMetagenerationMatch=1)
  assert status == 200 and json.loads(out)["metageneration"] == "2"
  assert _metadata(gcs, name, ifMetagenerationMatch=2)[0] == 200
  assert _metadata(gcs, name, ifMetagenerationNotMatch=1)[0] == 200
  assert _request(gcs, "DELETE", _object_path(gcs, name), ifMetagenerationNotMatch=2)[0] == 304
  assert _request(gcs, "DELETE", _object_path(gcs, name), ifMetagenerationMatch=1)[0] == 412
  assert _request(gcs, "DELETE", _object_path(gcs, name),
                  ifMetagenerationMatch=2)[0] in (200, 204)


def test_a_412_wins_over_a_304(gcs):
  obj = _new_object(gcs, "emulator/both")
  gen = int(obj["generation"])
  assert _metadata(gcs, obj["name"], ifGenerationNotMatch=gen,
                   ifGenerationMatch=gen + 1)[0] == 412
