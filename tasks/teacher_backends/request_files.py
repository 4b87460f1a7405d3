"""Teacher requests as JSON lines on disk, one request a line.

How a run avoids holding its request list: a shard's requests reach its worker as a file
(shards.py), and a submitted batch's requests are found again from a file when its results come
back (openai_batch.py). Writing and reading both go a request at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from tasks.teacher_backends.base import TeacherRequest


def request_line(request: TeacherRequest) -> str:
    """One request as a JSON line (newline included)."""
    return json.dumps(dataclasses.asdict(request), ensure_ascii=False) + "\n"


def request_from_dict(data: dict[str, Any]) -> TeacherRequest:
    return TeacherRequest(**{**data, "messages": tuple(data["messages"])})


def read_requests(path: Path) -> Iterator[TeacherRequest]:
    """The requests of a file written with `request_line`, in order, one at a time."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield request_from_dict(json.loads(line))


def write_requests(path: Path, requests: Iterable[TeacherRequest]) -> None:
    """Write (then fsync and rename into place) a file of `requests`, so a record that names it
    never names a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(request_line(r) for r in requests)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
