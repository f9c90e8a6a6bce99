"""Files the gateway serves from disk (catalogue images for the product page's visual part, the
storefront and its demo catalogue): safe product ids and one cache of whole files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
from collections import OrderedDict
from pathlib import Path

#: A product id that may name a file: no separators, no leading dot.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of a regular file, ``None`` for anything else or nothing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if stat.S_ISREG(st.st_mode) else None


class FileCache:
    """Whole files by path, re-read when their mtime or size changes; the least recently used go first."""

    def __init__(self, max_entries: int = 512) -> None:
        self._cache: OrderedDict[Path, tuple[tuple[int, int], bytes, str]] = OrderedDict()
        self._max = max_entries

    async def get(self, path: Path) -> tuple[bytes, str] | None:
        """(content, ETag), or ``None`` when there is no regular file to read."""
        stamp = _stamp(path)  # one stat call, as cheap as the cache lookup it guards
        if stamp is None:
            return None
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            self._cache.move_to_end(path)
            return cached[1], cached[2]
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError:
            return None
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        self._cache[path] = (stamp, data, etag)
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return data, etag
