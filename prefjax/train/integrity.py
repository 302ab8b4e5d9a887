"""Is a saved checkpoint step intact? File manifests and restore-error triage.

Orbax writes a step into a temporary directory and renames it when complete, so
a step that a crash cut short is never listed; TensorStore checks the OCDBT
manifest, b-tree nodes and shard indices it reads (``DATA_LOSS``,
``OUT_OF_RANGE``, ... errors), but not the array chunks themselves: a flipped
bit inside a data file restores as a wrong parameter, silently. Nor does it
notice a file truncated or deleted after the step was finalized until a restore
trips over it, and then the error names an array, not a file. So once a step is
final, :func:`write_manifest` records the size and SHA-256 digest of every file
in it, and the digest of that record (``prefjax_files.json``), and
:func:`find_damage` compares the files with it before a restore, sizes first:
that catches truncation, deletion and changed bytes in any file, and names it.
Hashing reads each file once (≈ 1.6 GB/s on a CPU with SHA extensions), at the
save after the step's and at a restore. A step without a manifest (its run was
killed before recording it) is checked for orbax's metadata files, and a failed
restore is triaged by :func:`is_damage`. Manifests of older runs hold sizes only
and are checked for sizes. Remote directories (``gs://...``) get the triage only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from prefjax import files

MANIFEST = "prefjax_files.json"
# Metadata files orbax needs to restore a step of the Checkpointer's three items.
_REQUIRED = ("state/_METADATA", "state/manifest.ocdbt", "data/metadata", "config/metadata")
_JSON = ("state/_METADATA", "data/metadata", "config/metadata")
# TensorStore status codes that mean "what is on disk is missing or corrupt" (a
# model/checkpoint mismatch is an error without such a code).
_TENSORSTORE_DAMAGE = re.compile(
    r"^(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION|UNAVAILABLE|INTERNAL): ")


def _manifest_temporaries(step_dir: str) -> list[str]:
  """What a process killed while writing the manifest leaves (``files.write_atomically``)."""
  return [name for name in os.listdir(step_dir) if name.startswith(f".{MANIFEST}.tmp")]


def _files(step_dir: str) -> dict[str, int]:
  sizes = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      sizes[os.path.relpath(path, step_dir)] = os.path.getsize(path)
  for name in [MANIFEST, *_manifest_temporaries(step_dir)]:
    sizes.pop(name, None)
  return sizes


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _entries_digest(entries: dict) -> str:
  return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def write_manifest(step_dir: str) -> None:
  """Records the size and SHA-256 of every file of a finalized step, and the digest of
  that record, so that damage to the manifest itself is told apart (written atomically;
  the temporary of an earlier write that was killed is removed)."""
  for name in _manifest_temporaries(step_dir):
    os.remove(os.path.join(step_dir, name))
  entries = {name: {"size": size, "sha256": _sha256(os.path.join(step_dir, name))}
             for name, size in _files(step_dir).items()}
  record = {"files": entries, "sha256": _entries_digest(entries)}
  files.write_atomically(os.path.join(step_dir, MANIFEST),
                         lambda f: json.dump(record, f, indent=0, sort_keys=True), mode="w")


def _expected(saved: dict) -> dict[str, tuple[int, str | None]]:
  """``{file: (size, sha256 or None)}`` from a manifest; older ones are ``{file: size}``."""
  if not isinstance(saved, dict):
    raise ValueError(f"expected an object, got {type(saved).__name__}")
  if set(saved) == {"files", "sha256"}:
    entries = saved["files"]
    if not isinstance(entries, dict) or _entries_digest(entries) != saved["sha256"]:
      raise ValueError("its record of files does not match its own sha256")
  else:
    entries = saved
  expected = {}
  for name, entry in entries.items():
    if isinstance(entry, int):
      expected[name] = (entry, None)
    elif isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(
        entry.get("sha256"), str):
      expected[name] = (entry["size"], entry["sha256"])
    else:
      raise ValueError(f"entry {name!r} is {entry!r}, expected a size and a sha256")
  return expected


def _compare(step_dir: str, expected: dict[str, tuple[int, str | None]]) -> str | None:
  found = _files(step_dir)
  for name, (size, _) in sorted(expected.items()):
    if name not in found:
      return f"{name}: missing"
    if found[name] != size:
      return f"{name}: {found[name]} bytes, {size} when saved"
  for name, (_, digest) in sorted(expected.items()):
    if digest is not None and (now := _sha256(os.path.join(step_dir, name))) != digest:
      return (f"{name}: contents changed since saved (sha256 {now[:12]}…, "
              f"{digest[:12]}… when saved)")
  return None


def _check_metadata(step_dir: str) -> str | None:
  for name in _REQUIRED:
    if not os.path.exists(os.path.join(step_dir, name)):
      return f"{name}: missing"
  for name in _JSON:
    try:
      with open(os.path.join(step_dir, name)) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      return f"{name}: unreadable ({e})"
  return None


def is_local(path: str) -> bool:
  """Manifests and metadata checks need a local (or mounted) file system; on
  ``gs://`` and the like only TensorStore's checks apply."""
  return "://" not in path


def find_damage(step_dir: str) -> str | None:
  """``"<file>: <what is wrong>"`` for the first damaged file of a step, else None."""
  if not is_local(step_dir):
    return None
  manifest = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(manifest):
    return _check_metadata(step_dir)
  try:
    with open(manifest) as f:
      expected = _expected(json.load(f))
  except (OSError, ValueError) as e:
    return f"{MANIFEST}: unreadable ({e})"
  # The metadata check too: a manifest listing fewer files (an empty one) vouches for none.
  return _compare(step_dir, expected) or _check_metadata(step_dir)


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def is_damage(exc: BaseException) -> bool:
  """Whether a restore error means missing/corrupt files rather than a mismatch."""
  return any(isinstance(e, (OSError, json.JSONDecodeError))
             or _TENSORSTORE_DAMAGE.match(str(e)) for e in _chain(exc))


def describe(exc: BaseException) -> str:
  """The first line of the most specific error in ``exc``'s chain (the file or
  array it names), without TensorStore's multi-line spec dump."""
  for e in _chain(exc):
    if isinstance(e, (OSError, json.JSONDecodeError)) or _TENSORSTORE_DAMAGE.match(str(e)):
      return str(e).split(" [tensorstore_spec")[0].splitlines()[0]
  return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
