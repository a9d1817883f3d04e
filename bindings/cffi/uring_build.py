"""cffi (API mode) builder for umgr.bindings._uring, over liburing.

setup.py names this file in ``cffi_modules``; this folder is build-time only
(not installed). ``python bindings/cffi/uring_build.py`` compiles the module
in place (into ``bindings/``, i.e. umgr.bindings) for development.
"""
import os
import sys

import cffi

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    import _cdef_uring
finally:
    sys.path.remove(_HERE)

ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef_uring.TYPES + _cdef_uring.FUNCTIONS)
ffibuilder.set_source(
    "umgr.bindings._uring",
    _cdef_uring.INCLUDES + _cdef_uring.CUSTOMIZATIONS,
    libraries=["uring"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    import glob
    import shutil

    package = os.path.dirname(_HERE)
    out = ffibuilder.compile(tmpdir=os.path.join(package, os.pardir, "build", "cffi"))
    for old in glob.glob(os.path.join(package, "_uring.*.so")):
        os.remove(old)
    shutil.copy2(out, package)
    print(os.path.join(package, os.path.basename(out)))
