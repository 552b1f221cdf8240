"""shmdedup._shm: anonymous shm objects, error translation, holes and extents."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import secrets
from collections.abc import Iterator

import pytest

from shmdedup import _shm
from shmdedup.errors import ArgumentError, Error, ShmError

P = _shm.PAGE_SIZE
# posix_ipc reached through _shm, which stays the only module importing it.
posix_ipc = _shm.posix_ipc


def our_shm_names() -> set[str]:
    # Other xdist workers create objects concurrently; only this pid's count.
    marker = f"-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if "shmdedup" in n and marker in n}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """A list the test appends its fds to; all are closed afterwards."""
    owned: list[int] = []
    yield owned
    for fd in owned:
        os.close(fd)


@pytest.fixture(autouse=True)
def no_names_left() -> Iterator[None]:
    before = our_shm_names()
    yield
    assert our_shm_names() == before


def test_create_gives_private_unlinked_fd(fds: list[int]) -> None:
    fd = _shm.create(3 * P, "test")
    fds.append(fd)
    st = os.fstat(fd)
    assert st.st_size == 3 * P
    assert st.st_mode & 0o7777 == 0o600
    assert st.st_nlink == 0  # unlinked: no name anywhere
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert _shm.allocated_bytes(fd) == 0
    os.pwrite(fd, b"abc", P)
    assert os.pread(fd, 3, P) == b"abc"


def test_create_leaves_no_name_and_no_fd(fds: list[int]) -> None:
    before_fds = open_fds()
    for i in range(5):
        fds.append(_shm.create(i * P))
        assert our_shm_names() == set()
    assert open_fds() == before_fds + 5


def test_create_zero_and_largest_size(fds: list[int]) -> None:
    fds.append(_shm.create(0))
    assert os.fstat(fds[-1]).st_size == 0
    fds.append(_shm.create(2**63 - 1))  # sparse: costs nothing
    assert os.fstat(fds[-1]).st_size == 2**63 - 1


@pytest.mark.parametrize("size", [-1, 2**63, 1.0, True, False, "4096", None])
def test_create_rejects_bad_size(size: object) -> None:
    with pytest.raises(ArgumentError) as info:
        _shm.create(size)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, Error)


@pytest.mark.parametrize("tag", ["", "a/b", "x" * 65, "sp ace", 3])
def test_create_rejects_bad_tag(tag: object) -> None:
    with pytest.raises(ArgumentError):
        _shm.create(P, tag)  # type: ignore[arg-type]


def test_create_translates_eexist(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"/shmdedup-test-{os.getpid()}-{secrets.token_hex(8)}"
    squatter = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    try:
        monkeypatch.setattr(_shm, "_new_name", lambda tag: name)
        with pytest.raises(ShmError) as info:
            _shm.create(P)
    finally:
        squatter.close_fd()
        squatter.unlink()
    assert info.value.errno == errno.EEXIST
    assert "shm_open" in str(info.value)
    assert isinstance(info.value.__cause__, posix_ipc.ExistentialError)


def test_create_cleans_up_when_ftruncate_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    before_fds = open_fds()
    monkeypatch.setattr(_shm.os, "ftruncate", no_space)
    with pytest.raises(ShmError) as info:
        _shm.create(P)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert "ftruncate" in str(info.value)
    assert open_fds() == before_fds  # no_names_left checks /dev/shm


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (posix_ipc.ExistentialError("Shared memory with the specified name already exists"), errno.EEXIST),
        (posix_ipc.ExistentialError("No shared memory exists with the specified name"), errno.ENOENT),
        (posix_ipc.ExistentialError("something new"), errno.EEXIST),
        (posix_ipc.PermissionsError("No permission to access this segment"), errno.EACCES),
        (posix_ipc.PermissionsError("The memory is read-only"), errno.EACCES),
        (posix_ipc.PermissionsError("?"), errno.EACCES),
        (ValueError("Invalid parameter(s)"), errno.EINVAL),
        (ValueError("The name is too long"), errno.ENAMETOOLONG),
        (ValueError("The size is invalid or the memory is read-only"), errno.EINVAL),
        (OSError("This process already has the maximum number of files open"), errno.EMFILE),
        (OSError("The system limit on the total number of open files has been reached"), errno.ENFILE),
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), errno.ENOMEM),
        (MemoryError("Out of memory"), errno.ENOMEM),
        (posix_ipc.Error("mystery"), errno.EIO),
    ],
)
def test_translate_error(exc: BaseException, expected: int) -> None:
    err = _shm.translate_error(exc, "shm_open", "/name")
    assert isinstance(err, ShmError) and isinstance(err, OSError) and isinstance(err, Error)
    assert err.errno == expected
    assert err.strerror == f"shm_open: {os.strerror(expected)}"
    assert err.filename == "/name"


def test_resize(fds: list[int]) -> None:
    fds.append(_shm.create(P))
    _shm.resize(fds[0], 10 * P)
    assert os.fstat(fds[0]).st_size == 10 * P
    _shm.resize(fds[0], 0)
    assert os.fstat(fds[0]).st_size == 0
    with pytest.raises(ArgumentError):
        _shm.resize(fds[0], -1)


def test_resize_bad_fd_names_the_call() -> None:
    with pytest.raises(ShmError) as info:
        _shm.resize(2**31 - 1, P)
    assert info.value.errno == errno.EBADF
    assert "ftruncate" in str(info.value)


def test_reopen_readonly_cannot_write(fds: list[int]) -> None:
    fd = _shm.create(2 * P)
    fds.append(fd)
    os.pwrite(fd, b"stable", 0)
    ro = _shm.reopen_readonly(fd)
    fds.append(ro)
    assert ro != fd
    assert fcntl.fcntl(ro, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(ro, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.pread(ro, 6, 0) == b"stable"
    with mmap.mmap(ro, 2 * P, mmap.MAP_SHARED, mmap.PROT_READ) as view:
        assert view[:6] == b"stable"
    # A failed mmap cannot crash the process, so this runs in-process.
    with pytest.raises(PermissionError) as info:
        mmap.mmap(ro, 2 * P, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    assert info.value.errno == errno.EACCES
    with pytest.raises(OSError) as info2:
        os.pwrite(ro, b"x", 0)
    assert info2.value.errno == errno.EBADF
    # Its own open file description: the original's offset is untouched.
    os.lseek(ro, P, os.SEEK_SET)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0


def test_reopen_readonly_bad_fd() -> None:
    with pytest.raises(ShmError) as info:
        _shm.reopen_readonly(2**31 - 1)
    assert info.value.errno == errno.ENOENT


@pytest.fixture(params=["default", "ctypes"])
def punch_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "ctypes":
        monkeypatch.setattr(_shm, "_native_punch_hole", None)
    return str(request.param)


def test_punch_hole_frees_memory_keeps_size(fds: list[int], punch_path: str) -> None:
    fd = _shm.create(4 * P)
    fds.append(fd)
    os.pwrite(fd, b"\x01" * (4 * P), 0)
    assert _shm.allocated_bytes(fd) == 4 * P
    _shm.punch_hole(fd, P, 2 * P)
    assert _shm.allocated_bytes(fd) == 2 * P
    assert os.fstat(fd).st_size == 4 * P
    assert os.pread(fd, 4 * P, 0) == b"\x01" * P + bytes(2 * P) + b"\x01" * P


def test_punch_hole_errors(punch_path: str) -> None:
    with pytest.raises(OSError) as info:
        _shm.punch_hole(2**31 - 1, 0, P)
    assert info.value.errno == errno.EBADF
    for offset, length in [(-1, P), (0, 0), (0, -P), (P, 2**63 - P)]:
        with pytest.raises(ArgumentError):
            _shm.punch_hole(0, offset, length)


@pytest.fixture(params=["cachestat", "seeks"])
def finder(request, monkeypatch) -> str:
    """data_extents / next_data both ways: by cachestat (what a kernel since
    6.5 does), and by SEEK_DATA/SEEK_HOLE (older kernels)."""
    if request.param == "seeks":
        monkeypatch.setattr(_shm, "_cachestat", False)
    return str(request.param)


def test_data_extents_skips_holes(fds: list[int], finder: str) -> None:
    fd = _shm.create(8 * P)
    fds.append(fd)
    assert _shm.data_extents(fd, 0, 8 * P) == []
    os.pwrite(fd, b"a", P)
    os.pwrite(fd, b"b" * (2 * P), 3 * P)
    os.pwrite(fd, b"c", 7 * P + 5)
    before = _shm.allocated_bytes(fd)
    assert _shm.data_extents(fd, 0, 8 * P) == [(P, P), (3 * P, 2 * P), (7 * P, P)]
    # Clipped to [start, end), including a start inside a data page.
    assert _shm.data_extents(fd, P + 100, 4 * P) == [(P + 100, P - 100), (3 * P, P)]
    assert _shm.data_extents(fd, 2 * P, 3 * P) == []
    assert _shm.data_extents(fd, 5 * P, 5 * P) == []
    assert _shm.data_extents(fd, 9 * P, 20 * P) == []  # past EOF: ENXIO
    assert _shm.allocated_bytes(fd) == before  # looking allocated nothing
    _shm.punch_hole(fd, 3 * P, P)
    assert _shm.data_extents(fd, 0, 8 * P) == [(P, P), (4 * P, P), (7 * P, P)]


def test_data_extents_truncated_between_the_seeks(fds: list[int], monkeypatch) -> None:
    """Another process truncates the object right after SEEK_DATA found data:
    SEEK_HOLE then fails with ENXIO.  The walk ends there, no error."""
    monkeypatch.setattr(_shm, "_cachestat", False)
    fd = _shm.create(4 * P)
    fds.append(fd)
    os.pwrite(fd, b"x" * (4 * P), 0)
    real = os.lseek

    def lseek(f: int, pos: int, how: int) -> int:
        got = real(f, pos, how)
        if how == os.SEEK_DATA and got >= 2 * P:
            os.ftruncate(f, P)          # the owner shrinks it now
        return got
    monkeypatch.setattr(_shm.os, "lseek", lseek)
    assert _shm.data_extents(fd, 2 * P, 4 * P) == []
    os.ftruncate(fd, 4 * P)
    os.pwrite(fd, b"y", 3 * P)
    assert _shm.data_extents(fd, 0, 4 * P) == [(0, P)]


def test_data_extents_under_truncation_churn(fds: list[int], finder: str) -> None:
    """ftruncate(0) / ftruncate(full) / write in a loop (the attack that took
    the coordinator down): every answer is a list of extents inside the
    range, never an error."""
    fd = _shm.create(64 * P)
    fds.append(fd)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.ftruncate(fd, 0)
            os.ftruncate(fd, 64 * P)
            os.pwrite(fd, b"z" * (4 * P), 8 * P)
    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(20000):
            for start, length in _shm.data_extents(fd, 0, 64 * P):
                assert 0 <= start and start + length <= 64 * P and length > 0
    finally:
        stop.set()
        t.join()


def test_data_extents_bad_range(fds: list[int]) -> None:
    fds.append(_shm.create(P))
    with pytest.raises(ArgumentError):
        _shm.data_extents(fds[0], P, 0)
    with pytest.raises(ArgumentError):
        _shm.data_extents(fds[0], -1, P)


def test_data_extents_and_next_data_agree_with_the_seeks(fds: list[int], monkeypatch) -> None:
    """Random layouts of data and holes, random ranges (windows of the mask
    made small, so runs cross them): cachestat's answers are the seeks'."""
    import random
    rng = random.Random(7)
    monkeypatch.setattr(_shm, "_MASK_PAGES", 5)
    for _ in range(60):
        n = rng.randrange(1, 48)
        fd = _shm.create(n * P)
        fds.append(fd)
        for page in rng.sample(range(n), rng.randrange(0, n + 1)):
            os.pwrite(fd, b"d", page * P + rng.randrange(P))
        for _ in range(10):
            a = rng.randrange(0, (n + 2) * P)
            b = rng.randrange(a, (n + 3) * P)
            assert _shm.data_extents(fd, a, b) == _shm._seek_extents(fd, a, b), (n, a, b)
            assert _shm.next_data(fd, a) == _shm._seek_data(fd, a), (n, a)

