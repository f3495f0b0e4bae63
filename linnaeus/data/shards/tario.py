"""A minimal sequential tar reader: ``(member name, bytes)`` for each regular file, in archive order.

Python's ``tarfile`` spends tens of microseconds of bookkeeping per member (TarInfo objects, stream wrappers),
which made reading a warm shard slower than opening the same images one by one; a shard reader needs only
"next header, next payload". This parses the 512-byte headers directly (USTAR/GNU/PAX, as written by
``tarfile``, GNU tar and WebDataset) and verifies each header checksum, so a garbled or truncated shard is
reported (``TarFormatError``) instead of yielding garbage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

BLOCK = 512
_ZERO = bytes(BLOCK)


class TarFormatError(ValueError):
    """The stream is not a well-formed tar archive (bad header checksum, truncated member, bad size field)."""


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad numeric header field {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    # The checksum is computed with its own 8-byte field taken as spaces (8 * 32 = 256).
    return stored == sum(header[:148]) + 256 + sum(header[156:])


def _pax_path(data: bytes) -> str | None:
    pos, path = 0, None
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def _read_exact(fh: IO[bytes], n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise TarFormatError(f"unexpected end of archive in {what} ({len(data)} of {n} bytes)")
    return data


def iter_tar_members(fh: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """Regular files of the tar stream ``fh`` as ``(name, payload)``; other member types are skipped."""
    long_name: str | None = None
    while True:
        header = fh.read(BLOCK)
        if header == _ZERO:
            return  # end-of-archive marker
        if not header:
            # tar itself tolerates a missing marker, but every shard we write has one: its absence means the
            # file was cut exactly at a member boundary (an interrupted copy), and samples are missing.
            raise TarFormatError("unexpected end of archive (no end-of-archive marker)")
        if len(header) != BLOCK:
            raise TarFormatError(f"unexpected end of archive in a header ({len(header)} of {BLOCK} bytes)")
        if not _checksum_ok(header):
            raise TarFormatError("bad tar header checksum")
        size = _number(header[124:136])
        kind = header[156:157]
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        payload = _read_exact(fh, size, name or "a member")
        pad = -size % BLOCK
        if pad:
            _read_exact(fh, pad, f"the padding of {name}")
        if kind == b"x":  # PAX extended header: may carry the next member's long name
            long_name = _pax_path(payload) or long_name
        elif kind == b"L":  # GNU long name
            long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            yield (long_name or name), payload
            long_name = None
        else:  # directories, links, global headers: nothing to read
            long_name = None
