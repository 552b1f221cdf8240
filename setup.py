"""Build the C core (native/) as shmdedup._native. All metadata is in pyproject.toml."""
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    raise SystemExit("shmdedup needs Linux (POSIX shared memory, fallocate, SIGSEGV copy-on-write)")

SOURCES = ["module.c", "py_testhooks.c", "py_index.c", "py_mapping.c", "sd_fault.c", "sd_hash.c", "sd_index.c", "sd_pages.c",
           "sd_region.c", "sd_break.c", "sd_trap.c", "sd_merge.c", "sd_view.c"]

setup(
    ext_modules=[
        Extension(
            "shmdedup._native",
            sources=["native/" + s for s in SOURCES],
            include_dirs=["native"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fno-strict-aliasing"],
        )
    ]
)
