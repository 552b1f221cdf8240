"""The plain-C primitives without Python: native/tests/test_sd.c, built with the
system compiler, checks the hash table, XXH64, page reads and punches, and a
merge followed by break_cow on real memfd objects.  It also holds the reference
MurmurHash3 x64-128, which mmh3 (the test oracle the project keeps) must match."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

NATIVE = Path(__file__).resolve().parents[2] / "native"
SOURCES = ["tests/test_sd.c", "sd_hash.c", "sd_index.c", "sd_pages.c", "sd_region.c", "sd_break.c",
           "sd_merge.c", "sd_fault.c", "sd_view.c"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        pytest.skip(f"no C compiler ({cc})")
    out = str(tmp_path_factory.mktemp("c_core") / "test_sd")
    cmd = [cc, "-O1", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fno-strict-aliasing",
           "-I", str(NATIVE), "-o", out, *(str(NATIVE / s) for s in SOURCES), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def murmur3(driver: str, data: bytes, seed: int) -> tuple[int, int]:
    r = subprocess.run([driver, "murmur3", data.hex(), str(seed)], capture_output=True, text=True,
                       check=True)
    h1, h2 = r.stdout.split()
    return int(h1), int(h2)


def test_selftest(driver: str) -> None:
    r = subprocess.run([driver, "selftest"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


@pytest.mark.parametrize("data, seed, want", [
    (b"", 0, (0, 0)),
    (b"abc", 0, (13012657714217449575, 4297124817637354834)),
    (b"abc", 2**32 - 1, (6497983451653082904, 6625092142591915913)),
])
def test_murmur3_known_answers(driver: str, data: bytes, seed: int, want: tuple[int, int]) -> None:
    assert murmur3(driver, data, seed) == want == mmh3.hash64(data, seed, signed=False)


def test_murmur3_every_tail_length(driver: str) -> None:
    for length in range(0, 40):
        data = os.urandom(length)
        assert murmur3(driver, data, 42) == mmh3.hash64(data, 42, signed=False)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=600), seed=st.integers(0, 2**32 - 1))
def test_murmur3_random_bytes(driver: str, data: bytes, seed: int) -> None:
    assert murmur3(driver, data, seed) == mmh3.hash64(data, seed, signed=False)
