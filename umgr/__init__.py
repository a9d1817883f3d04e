"""umgr: a userspace memory manager for Linux (see README.md)."""
import os as _os

__version__ = "0.1.0"

# numpy's OpenBLAS (and MKL or OpenMP builds alike) starts a thread per CPU as
# it loads, and OpenBLAS's threads spin before they sleep: 0.1 s of CPU at
# every `umgr exec` on 2 vCPUs, more on a machine with more. umgr does no linear
# algebra. The libraries read these variables once, as they load, so they are
# set for numpy's import only: the programs umgr runs get the user's values.
_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _import_numpy_single_threaded() -> None:
    saved = {name: _os.environ.get(name) for name in _ONE_THREAD}
    _os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))
    try:
        import numpy  # noqa: F401
    finally:
        for name, value in saved.items():
            if value is None:
                del _os.environ[name]
            else:
                _os.environ[name] = value


_import_numpy_single_threaded()
