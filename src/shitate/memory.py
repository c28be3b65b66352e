"""Memory: give freed memory back, and check a training configuration fits before spending time on it."""

from __future__ import annotations


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so peak memory reflects what is in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the process instead
        pass
