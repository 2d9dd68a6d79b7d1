"""Reads the records of an offline W&B run file (wandb no longer ships a reader for them).

The file is a 7-byte header, then LevelDB log-format blocks of 32 KiB; each chunk has a 4-byte crc32c, a 2-byte
little-endian length and a 1-byte type (1 full, 2 first, 3 middle, 4 last). Payloads are ``Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def read_finished_run(path: Path, timeout: float = 60.0) -> list[Any]:
    """The records of a run file once its writer is done: ``run.finish()`` can return while wandb-core still writes.

    Waits until the file parses, holds the ``exit`` record and stops growing.
    """
    deadline, last_size = time.monotonic() + timeout, -1
    while True:
        size = Path(path).stat().st_size
        try:
            records = read_records(path)
            done = size == last_size and any(r.WhichOneof("record_type") == "exit" for r in records)
        except Exception:  # a record still being written
            records, done = [], False
        if done or time.monotonic() > deadline:
            return records
        last_size = size
        time.sleep(0.25)


def run_contents(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The config (key -> value) and the history rows stored in an offline run folder."""
    (run_file,) = Path(run_dir).glob("run-*.wandb")
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for record in read_finished_run(run_file):
        kind = record.WhichOneof("record_type")
        # the config arrives as config updates, or (when the run starts after it was set) inside the run record
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in updates:  # a key, or a path of nested keys (how wandb-core may send merged updates)
            *parents, leaf = list(item.nested_key) or [item.key]
            target = config
            for name in parents:
                target = target.setdefault(name, {})
            target[leaf] = json.loads(item.value_json)
        if kind in ("config", "run"):
            continue
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return config, history
