"""Thread limits for the numeric libraries, so a node uses only the cores it was scheduled for.

BLAS and OpenMP pools (numpy, scipy) otherwise start one thread per core in every process: two
nodes side by side on two cores then run four or more busy threads and slow each other far more
than twice. ITK (antspyx) runs single-threaded everywhere: ANTs' registration is reproducible
only with one thread, and uses about one core anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: ITK's thread count for every ANTs call (reproducible registrations).
ITK_THREADS = 1
#: Read by BLAS and OpenMP runtimes that load while a limit holds (threadpoolctl limits the ones
#: already loaded).
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_itk_threads() -> None:
    """Fix ITK's global default thread count; must run before antspyx starts ITK."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ITK_THREADS)


@contextmanager
def limit_threads(n_threads: int) -> Iterator[None]:
    """BLAS and OpenMP pools limited to ``n_threads`` while the block runs."""
    import scipy.linalg  # noqa: F401 - loads scipy's own BLAS, so that the limit reaches it too
    from threadpoolctl import threadpool_limits

    n_threads = max(1, int(n_threads))
    pin_itk_threads()
    saved = {name: os.environ.get(name) for name in _THREAD_ENV}
    os.environ.update({name: str(n_threads) for name in _THREAD_ENV})
    try:
        with threadpool_limits(limits=n_threads):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
