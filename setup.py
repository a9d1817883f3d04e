"""setuptools needs code for two things pyproject.toml cannot say:
the cffi API-mode modules and the LD_PRELOAD shim (a plain C shared object
that is built like an extension but never imported)."""
from setuptools import Extension, setup

shim = Extension(
    "umgr.bindings.libumgr_preload",
    sources=["bindings/shim/preload.c"],
    depends=["bindings/shim/protocol.h"],
    extra_compile_args=["-O2", "-Wall", "-fvisibility=hidden"],
    libraries=["pthread", "dl"],
)

setup(
    cffi_modules=[
        "bindings/kernel_build.py:ffibuilder",
        "bindings/uring_build.py:ffibuilder",
    ],
    ext_modules=[shim],
)
