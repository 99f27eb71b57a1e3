"""Hand freed memory back to the operating system between the chunks of a long streamed computation.

glibc's malloc serves an array of up to 32 MiB from its heap once its dynamic mmap threshold has risen
(it rises to the size of the largest block freed so far), and keeps freed heap blocks for reuse. A loop
that loads a chunk of maps, works on it and frees it, while small arrays that outlive the chunk are
allocated in between, leaves the freed blocks split by those small ones: the next chunk no longer fits in
them and the heap grows. Evaluating a class of 20,000 maps in chunks of 100 grew the resident set to
the size of the whole class that way, although no chunk was kept. ``malloc_trim(0)`` returns the free
pages inside the heap, so the resident set stays that of one chunk. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


def release_free_memory() -> None:
    """Return the allocator's free pages to the operating system (glibc's ``malloc_trim(0)``, ~10 us)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
