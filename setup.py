"""setuptools needs code for what pyproject.toml cannot say:
- the cffi API-mode modules and the LD_PRELOAD shim (a plain C shared object
  that is built like an extension but never imported);
- the package list, found rather than written out: an `umgr` subpackage left
  off a hand-written list installs a umgr that cannot start.
`policies/`, `bindings/` and `bench/` install as umgr.policies, umgr.bindings
and umgr.benchmarks (with the C programs the benchmarks compile, so `umgr
bench` runs from a wheel); bindings/cffi/ (the build scripts) and the shim's C
sources are not installed."""
import glob

from setuptools import Extension, find_packages, setup

shim = Extension(
    "umgr.bindings.libumgr_preload",
    sources=["bindings/shim/preload.c"],
    depends=["bindings/shim/protocol.h", "bindings/shim/size.h", "bindings/shim/umgr.h", "bindings/shim/pagehash.h"],
    extra_compile_args=["-O2", "-Wall", "-fvisibility=hidden"],
    libraries=["pthread", "dl"],
)

setup(
    packages=find_packages(include=["umgr", "umgr.*"]) + ["umgr.policies", "umgr.bindings", "umgr.benchmarks"],
    package_dir={"umgr.policies": "policies", "umgr.bindings": "bindings", "umgr.benchmarks": "bench"},
    package_data={
        # umgr.h is for C programs that call umgr_advise (README "Hints").
        "umgr.bindings": ["shim/umgr.h"],
        "umgr.benchmarks": ["programs/*.c", "programs/*.py", "programs/*.java"],
    },
    include_package_data=False,
    # The systemd unit and the Prometheus/Grafana files, as share/umgr/ under
    # the install prefix (README "Running as a service").
    data_files=[("share/umgr", sorted(glob.glob("deploy/*")))],
    cffi_modules=[
        "bindings/cffi/kernel_build.py:ffibuilder",
        "bindings/cffi/uring_build.py:ffibuilder",
    ],
    ext_modules=[shim],
)
