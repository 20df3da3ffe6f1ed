"""What an Arrow IPC file says about its record batches, read before pyarrow decodes any of them.

pyarrow reads a shard memory-mapped, so an uncompressed buffer costs no more than the file; but a
compressed buffer (zstd or LZ4 body compression) starts with the int64 length it decodes to, and
pyarrow allocates that length and decompresses into it before anything can look at the result. A
few KiB of zstd can claim, and hold, gigabytes. So the reader walks the file's own metadata first —
its footer's record-batch blocks, each batch's length, field nodes and buffers — and refuses a
batch whose rows or decoded buffer lengths exceed what the store's index declares
(:func:`check_batch`), before ``get_batch`` or ``read_all`` runs.

The metadata is flatbuffers (``format/File.fbs``, ``Message.fbs``, ``Schema.fbs`` of the Arrow
spec); the few tables needed are read here by hand, every offset checked against the bytes it
points into, so a crafted offset is an :class:`IpcError`, never a read outside the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"ARROW1"
RECORD_BATCH = 3  # MessageHeader union: the type of a record batch message
CONTINUATION = 0xFFFFFFFF
UNCOMPRESSED = -1  # a compressed body's buffer prefix for "stored as is"


class IpcError(ValueError):
    """The file is not the IPC file it claims to be, or claims more than it may; ``str`` is the problem."""


def _unpack(fmt: str, buf: memoryview, at: int) -> tuple:
    if at < 0 or at + struct.calcsize(fmt) > len(buf):
        raise IpcError(f"its metadata points outside itself (offset {at} of {len(buf)} bytes)")
    return struct.unpack_from(fmt, buf, at)


class _Table:
    """A flatbuffers table at ``pos`` of ``buf``: field ``i``'s slot is in its vtable, 0 meaning absent."""

    def __init__(self, buf: memoryview, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - _unpack("<i", buf, pos)[0]
        self.vtable_bytes = _unpack("<H", buf, self.vtable)[0]

    def _at(self, i: int) -> int | None:
        slot = 4 + 2 * i
        if slot + 2 > self.vtable_bytes:
            return None
        offset = _unpack("<H", self.buf, self.vtable + slot)[0]
        return self.pos + offset if offset else None

    def scalar(self, i: int, fmt: str, default: int = 0) -> int:
        at = self._at(i)
        return default if at is None else _unpack(fmt, self.buf, at)[0]

    def table(self, i: int) -> _Table | None:
        at = self._at(i)
        return None if at is None else _Table(self.buf, at + _unpack("<I", self.buf, at)[0])

    def structs(self, i: int, fmt: str) -> list[tuple]:
        """A vector of structs (``fmt`` each)."""
        at = self._at(i)
        if at is None:
            return []
        vector = at + _unpack("<I", self.buf, at)[0]
        count, size = _unpack("<I", self.buf, vector)[0], struct.calcsize(fmt)
        if vector + 4 + count * size > len(self.buf):
            raise IpcError(f"its metadata lists {count} entries that do not fit in it")
        return [struct.unpack_from(fmt, self.buf, vector + 4 + k * size) for k in range(count)]


def _root(buf: memoryview) -> _Table:
    return _Table(buf, _unpack("<I", buf, 0)[0])


@dataclass(frozen=True)
class Block:
    """Where a record batch lies: its message's metadata (``metadata_length`` bytes) then its body."""

    offset: int
    metadata_length: int
    body_length: int


def record_batch_blocks(data: memoryview) -> list[Block]:
    """The footer's record-batch blocks, each checked to lie inside the file. A footer that lists
    dictionary batches is refused: a store's schema has no dictionary-encoded field."""
    size = len(data)
    if size < 2 * len(MAGIC) + 4 or bytes(data[:len(MAGIC)]) != MAGIC or bytes(data[-len(MAGIC):]) != MAGIC:
        raise IpcError("is not an Arrow IPC file (no ARROW1 at its ends)")
    footer_length = _unpack("<i", data, size - len(MAGIC) - 4)[0]
    start = size - len(MAGIC) - 4 - footer_length
    if footer_length <= 0 or start < len(MAGIC):
        raise IpcError(f"has a footer of {footer_length} bytes in a file of {size}")
    footer = _root(data[start:size - len(MAGIC) - 4])
    if footer.structs(2, "<qi4xq"):
        raise IpcError("lists dictionary batches, which no store field has")
    blocks = [Block(*fields) for fields in footer.structs(3, "<qi4xq")]
    for block in blocks:
        if min(block.offset, block.metadata_length, block.body_length) < 0 or \
                block.offset + block.metadata_length + block.body_length > start:
            raise IpcError(f"has a record batch at bytes {block.offset}+{block.metadata_length}+{block.body_length}, "
                           f"past its data ({start} bytes)")
    return blocks


@dataclass(frozen=True)
class Batch:
    """A record batch as its metadata describes it: rows, field nodes ``(length, null_count)`` and
    buffers ``(offset, length)`` within ``body``, which is compressed buffer by buffer or not at all."""

    length: int
    nodes: list[tuple[int, int]]
    buffers: list[tuple[int, int]]
    compressed: bool
    body: memoryview

    def decoded_length(self, k: int) -> int:
        """How many bytes buffer ``k`` becomes: what pyarrow allocates for it if the body is compressed
        (the buffer's int64 prefix), else its length in the mapped file."""
        offset, length = self.buffers[k]
        if offset < 0 or length < 0 or offset + length > len(self.body):
            raise IpcError(f"has buffer {k} at bytes {offset}+{length} of a {len(self.body)}-byte body")
        if not self.compressed or length == 0:
            return length
        if length < 8:
            raise IpcError(f"has compressed buffer {k} of {length} bytes, shorter than its length prefix")
        declared = _unpack("<q", self.body, offset)[0]
        if declared == UNCOMPRESSED:
            return length - 8
        if declared < 0:
            raise IpcError(f"says buffer {k} decodes to {declared} bytes")
        return declared


def read_batch(data: memoryview, block: Block) -> Batch:
    """The metadata of the record batch at ``block`` (pyarrow reads the same bytes to decode it)."""
    at = block.offset
    prefix = _unpack("<I", data, at)[0]
    if prefix == CONTINUATION:
        length, start = _unpack("<i", data, at + 4)[0], at + 8
    else:  # the pre-1.0 format: the length alone
        length, start = prefix, at + 4
    if length <= 0 or start + length > block.offset + block.metadata_length:
        raise IpcError(f"has a batch whose metadata ({length} bytes) overruns its block")
    message = _root(data[start:start + length])
    if message.scalar(1, "<B") != RECORD_BATCH:
        raise IpcError(f"has a block at byte {block.offset} that is not a record batch")
    body_length = message.scalar(3, "<q")
    if body_length != block.body_length:
        raise IpcError(f"has a batch whose body is {body_length} bytes, its block says {block.body_length}")
    batch = message.table(2)
    if batch is None:
        raise IpcError(f"has a record batch message at byte {block.offset} without its batch")
    compression = batch.table(3)
    if compression is not None and compression.scalar(1, "<b") != 0:  # 0: each buffer compressed on its own
        raise IpcError("compresses its body by a method other than buffer by buffer")
    body = block.offset + block.metadata_length
    return Batch(length=batch.scalar(0, "<q"), nodes=batch.structs(1, "<qq"), buffers=batch.structs(2, "<qq"),
                 compressed=compression is not None, body=data[body:body + body_length])


def check_batch(batch: Batch, rows: int, nodes: list[int], buffer_caps: list[tuple[str, int]]) -> None:
    """Refuse a batch that does not hold ``rows`` rows laid out as ``nodes`` (the length of every
    field node, in schema order, none with nulls) or whose buffer ``k`` decodes to more than
    ``buffer_caps[k]`` (a name for the message, the most bytes it may become)."""
    if batch.length != rows:
        raise IpcError(f"says it holds {batch.length} rows, the index {rows}")
    if [n for n, _ in batch.nodes] != nodes or any(nulls for _, nulls in batch.nodes):
        raise IpcError(f"has field nodes {batch.nodes[:8]}, the index's arrays make {[(n, 0) for n in nodes][:8]}")
    if len(batch.buffers) != len(buffer_caps):
        raise IpcError(f"has {len(batch.buffers)} buffers, its fields have {len(buffer_caps)}")
    for k, (what, cap) in enumerate(buffer_caps):
        decoded = batch.decoded_length(k)
        if decoded > cap:
            raise IpcError(f"has buffer {k} ({what}) that decodes to {decoded} bytes, its {rows} rows need at most {cap}")
