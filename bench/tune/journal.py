"""The journal file's torn records: what a crash or a full disk leaves in the middle of a write.

Optuna's journal is one JSON record per line, appended under a lock. A write cut off leaves a last
line without its end; Optuna's reader skips it, but the next record is appended to the same line,
and from then on the whole study is unreadable (JSONDecodeError). No reader ever applied a record
that does not parse, so dropping it loses nothing any process saw; every complete record is kept
(also one glued to the end of a torn one). The original file is kept beside it as a backup.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

RECORD_START = b'{"op_code":'  # every record Optuna writes begins so (json.dumps of its log dict)


@dataclass
class TornRecord:
    line: int  # 1-based
    offset: int  # byte offset of the line in the file
    length: int  # bytes dropped
    salvaged: bool  # a complete record glued to its end was kept


def scan(data: bytes) -> tuple[bytes, list[TornRecord]]:
    """(the journal without its torn records, the torn records)."""
    kept, torn, offset = [], [], 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        if line.endswith(b"\n") and _parses(line):
            kept.append(line)
        else:
            tail = _complete_tail(line) if line.endswith(b"\n") else None
            if tail:
                kept.append(tail)
            torn.append(TornRecord(number, offset, len(line) - len(tail or b""), bool(tail)))
        offset += len(line)
    return b"".join(kept), torn


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _complete_tail(line: bytes) -> bytes | None:
    """The last whole record in a line whose beginning is a torn one."""
    start = line.find(RECORD_START, 1)
    while start != -1:
        if _parses(line[start:]):
            return line[start:]
        start = line.find(RECORD_START, start + 1)
    return None


def repair(path: Path) -> str | None:
    """Drop torn records from the journal at ``path`` (holding Optuna's journal lock, so no write is
    under way), keeping the original as ``<name>.torn-<time>``. Returns what was done, or None if
    the journal is whole."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        kept, torn = scan(data)
        if not torn:
            return None
        backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while backup.exists():
            n += 1
            backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        temporary = path.with_name(f"{path.name}.repairing")
        temporary.write_bytes(kept)
        os.link(path, backup)  # the original, without needing space for a copy
        os.replace(temporary, path)
    finally:
        lock.release()
    where = "; ".join(f"line {t.line} at byte {t.offset:,} ({t.length:,} bytes{', a whole record after it kept' if t.salvaged else ''})"
                      for t in torn)
    return (f"Optuna journal {path} had {len(torn)} torn record(s), a write cut off by a crash or a full disk: {where}. "
            f"Dropped them (no process had read them); every complete record is kept; the original is {backup}")

