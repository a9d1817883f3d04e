"""cffi (API mode) builder for umgr.bindings._kernel: userfaultfd and
process-memory syscalls.

One small module per kernel interface (_cdef_uffd.py, _cdef_proc.py), each
with INCLUDES, TYPES, FUNCTIONS and CUSTOMIZATIONS strings, gathered here.

setup.py uses ``cffi_modules=["bindings/cffi/kernel_build.py:ffibuilder"]``.
This folder is build-time only: it is not a package and is not installed.
For development without installing, ``python bindings/cffi/kernel_build.py``
compiles in build/cffi and puts the extension in bindings/ (umgr.bindings).
"""

import glob
import importlib.util
import os
import shutil
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(HERE)   # bindings/, installed as umgr.bindings
MODULES = ["_cdef_uffd", "_cdef_proc", "_cdef_codec", "_cdef_fastfault"]   # in the order C needs them


def _load(name):
    # cffi's setuptools hook execs this file without putting its directory
    # on sys.path, so load the siblings by path.
    spec = importlib.util.spec_from_file_location(
        f"_umgr_build_{name}", os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_ffi():
    modules = [_load(name) for name in MODULES]
    ffi = cffi.FFI()
    ffi.cdef("\n".join(m.TYPES + m.FUNCTIONS for m in modules))
    ffi.set_source(
        "umgr.bindings._kernel",
        "\n".join([m.INCLUDES for m in modules] + [m.CUSTOMIZATIONS for m in modules]),
        include_dirs=[os.path.join(PACKAGE, "shim")],   # pagehash.h, shared with the shim
        depends=[os.path.join(PACKAGE, "shim", "pagehash.h")],   # (the two must hash alike: rebuilt together)
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        libraries=[lib for m in modules for lib in getattr(m, "LIBRARIES", [])],
    )
    return ffi


ffibuilder = build_ffi()


def compile_in_place():
    """Build into build/cffi and install as bindings/_kernel.abi3.so, the
    name `pip install -e .` gives it (cffi compiles for the limited API), so
    the two ways never leave a stale module shadowing the other: CPython
    prefers a cpython-3XX suffix over abi3."""
    tmpdir = os.path.join(PACKAGE, os.pardir, "build", "cffi")
    built = ffibuilder.compile(tmpdir=tmpdir)
    for stale in glob.glob(os.path.join(PACKAGE, "_kernel.cpython-*.so")):
        os.unlink(stale)
    target = os.path.join(PACKAGE, "_kernel.abi3.so")
    shutil.copyfile(built, target + ".tmp")
    os.replace(target + ".tmp", target)
    return target


if __name__ == "__main__":
    print(compile_in_place(), file=sys.stderr)
