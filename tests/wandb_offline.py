"""Read the history rows of an offline wandb run (`run-*.wandb`) without wandb's servers.

The file is a 7-byte header (":W&B", magic 0xBEE1, version) followed by LevelDB-log
framed records (32 KiB blocks; each chunk: crc32 u32, length u16, type u8) whose payloads
are `wandb_internal_pb2.Record` messages. wandb 0.31 ships no Python reader for it.
"""

import glob
import json
import os
import struct

BLOCK_SIZE = 32768
HEADER_LEN = 7
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path):
    with open(path, "rb") as handle:
        data = handle.read()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER_LEN])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a wandb datastore"
    pos, pending = HEADER_LEN, b""
    while pos + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        pos += CHUNK_HEADER.size
        if pos + length > len(data):
            break  # a chunk the writer service has not finished writing yet
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            break


def history_rows(run_dir_or_file):
    """Every `run.log` row as a dict of key -> decoded JSON value."""
    from wandb.proto import wandb_internal_pb2

    path = run_dir_or_file
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.wandb"), recursive=True))
        assert files, f"no .wandb file under {path}"
        path = files[-1]
    rows = []
    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def wait_for_rows(run_dir, predicate, expected, timeout=60.0):
    """History rows matching `predicate`, polling until `expected` of them are on disk: the
    offline writer is a separate service that flushes shortly after `wandb.finish()`."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        from google.protobuf.message import DecodeError

        try:
            rows = [row for row in history_rows(run_dir) if predicate(row)]
        except (AssertionError, OSError, DecodeError):  # not (completely) written yet
            rows = []
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)
