"""Safe use of pycrdt: applying untrusted updates, reading roots, building restores.

pycrdt raises ``ValueError`` or ``RuntimeError`` on many bad updates, and on some a
Rust panic surfaces as ``pyo3_runtime.PanicException``, which derives from
``BaseException``: ``except Exception`` misses it. Those are all caught here, and
nothing else (cancellation and interpreter exits pass through).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import pycrdt

_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)
_json = msgspec.json.Decoder()


def _is_crdt_failure(exc: BaseException) -> bool:
    if isinstance(exc, _PASS_THROUGH):
        return False
    if isinstance(exc, Exception):
        return not isinstance(exc, (MemoryError,))
    return type(exc).__name__ == "PanicException"


class UpdateRejected(Exception):
    """An update that pycrdt could not apply (malformed, or it would corrupt the document)."""


def apply(doc: pycrdt.Doc, update: bytes) -> None:
    """Apply an update; any pycrdt failure (a panic included) becomes ``UpdateRejected``.

    After a failure the document may be half-changed: the caller discards it.
    """
    try:
        doc.apply_update(update)
    except BaseException as exc:
        if _is_crdt_failure(exc):
            raise UpdateRejected(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        raise


def build(parts: Iterable[bytes]) -> pycrdt.Doc:
    """A document from a snapshot and updates, in order (raises ``UpdateRejected``)."""
    doc = pycrdt.Doc()
    for part in parts:
        apply(doc, part)
    return doc


def copy(doc: pycrdt.Doc) -> pycrdt.Doc:
    return build([doc.get_update()])


def merge(parts: Iterable[bytes]) -> bytes:
    """One update equal to all of ``parts`` (for compaction)."""
    return build(parts).get_update()


def merge_updates(updates: Sequence[bytes]) -> bytes | None:
    """One update holding every item of ``updates``, without building a document
    (a byte-level merge in Rust, about a microsecond per small update), for
    broadcasting a batch as one message. ``None`` when pycrdt fails: the caller
    sends the updates one by one instead.

    Only for updates already applied to a document: pycrdt does not validate here.
    """
    if len(updates) == 1:
        return updates[0]
    try:
        return pycrdt.merge_updates(*updates)
    except BaseException as exc:
        if _is_crdt_failure(exc):
            return None
        raise


KNOWN_ROOTS: dict[str, type[Any]] = {"activities": pycrdt.Array, "meta": pycrdt.Map}


def typed_roots(doc: pycrdt.Doc) -> dict[str, Any]:
    """Every root of the document with a type.

    A document built from updates does not know its roots' types (Yjs encodes the
    type only when a client reads the root), so each is read as the agreement schema
    says, or else as a map if it has keys, as text if it has characters, or as an
    array. Reading a root fixes its type in ``doc``: use a copy you own.
    """
    roots: dict[str, Any] = {}
    for name in list(doc.keys()):
        known = KNOWN_ROOTS.get(name)
        if known is not None:
            roots[name] = doc.get(name, type=known)
            continue
        as_map = doc.get(name, type=pycrdt.Map)
        if len(as_map):
            roots[name] = as_map
            continue
        as_text = doc.get(name, type=pycrdt.Text)
        roots[name] = as_text if str(as_text) else doc.get(name, type=pycrdt.Array)
    return roots


def plain(root: Any) -> Any:
    """A root type as plain values. pycrdt's ``to_py`` reads arrays item by item,
    each a walk from the start (quadratic: 7 s for 20,000 activities here); its
    ``str`` is one pass in Rust that yields JSON (25 ms for the same)."""
    if isinstance(root, pycrdt.Text):
        return str(root)
    return _json.decode(str(root))


def content(doc: pycrdt.Doc) -> dict[str, Any]:
    """The document's root types as plain JSON-able values (reads a copy)."""
    return {name: plain(root) for name, root in typed_roots(copy(doc)).items()}


def activities(doc: pycrdt.Doc) -> list[dict[str, Any]]:
    """The ``activities`` of an agreement document as plain dicts, in list order.

    Types the root as an array in ``doc``: pass a copy you own.

    Raises:
        UpdateRejected: the root is not an array pycrdt can read.
    """
    try:
        items = plain(doc.get("activities", type=pycrdt.Array)) or []
    except BaseException as exc:
        if not _is_crdt_failure(exc):
            raise
        raise UpdateRejected(f"activities unreadable: {type(exc).__name__}") from None
    return [a for a in items if isinstance(a, dict)]


def _fill(target: Any, value: Any) -> None:
    if isinstance(target, pycrdt.Text):
        del target[:]
        if value:
            target += str(value)
    elif isinstance(target, pycrdt.Array):
        del target[:]
        for item in value or []:
            target.append(_prelim(item))
    elif isinstance(target, pycrdt.Map):
        for key in list(target.keys()):
            del target[key]
        for key, item in (value or {}).items():
            target[key] = _prelim(item)


def _prelim(value: Any) -> Any:
    if isinstance(value, dict):
        return pycrdt.Map({k: _prelim(v) for k, v in value.items()})
    return value


def restore_update(live: pycrdt.Doc, version_state: bytes) -> bytes:
    """An update that makes ``live`` read like the version: a new edit, so every
    client follows it and nothing of the history is rewritten."""
    old = typed_roots(build([version_state]))
    scratch = copy(live)
    before = scratch.get_state()
    current = typed_roots(scratch)
    with scratch.transaction(origin="restore"):
        for name, root in old.items():
            target = current.get(name) or scratch.get(name, type=type(root))
            _fill(target, plain(root))
        for name, target in current.items():
            if name not in old:
                _fill(target, None)  # a root the version did not have is emptied
    return scratch.get_update(before)
