"""The files under deploy/ stay valid and true to the code (docs/deploy.md).

* The Kubernetes manifests parse, agree with each other and with the image
  (socket path, hostPath, uids, limits), validate against the Kubernetes
  schemas where ``kubernetes-validate`` is installed, and the coordinator's
  arguments are accepted by the real CLI: a coordinator runs with them.
* The systemd units pass ``systemd-analyze verify`` where it is installed, the
  socket unit listens where the service serves, and the service's command
  line serves on a socket passed the way the socket unit passes it.
* The Containerfile passes ``hadolint`` where it is installed.

Docker, Kubernetes and systemd themselves do not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT, no_shm_leftovers, reaper  # noqa: F401
from tests.integration.isolation import Coordinator, shared_socket_dir

DEPLOY = REPO_ROOT / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
SERVICE = DEPLOY / "systemd" / "shmdedup@.service"
SOCKET = DEPLOY / "systemd" / "shmdedup@.socket"
CONTAINERFILE = DEPLOY / "Containerfile"


@pytest.fixture
def socket_dir() -> Iterator[str]:
    d = shared_socket_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def manifests() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    out = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def flags(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]


def test_k8s_manifests_agree_with_each_other_and_the_image() -> None:
    docs = manifests()
    assert set(docs) == {"Namespace", "DaemonSet", "Deployment"}
    coord, worker = pod_spec(docs["DaemonSet"]), pod_spec(docs["Deployment"])
    assert coord["hostPID"] is True      # pidfds for workers in other pods (test_namespaces.py)
    c = coord["containers"][0]
    args = c["args"]
    socket_path = flags(args, "socket")[0]
    host_dirs = {v["name"]: v["hostPath"]["path"] for v in coord["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert os.path.dirname(socket_path) in {mounts[n] for n in host_dirs}

    w = worker["containers"][0]
    env = {e["name"]: e["value"] for e in w["env"]}
    assert env["SHMDEDUP_SOCKET"] == socket_path
    wmounts = {m["name"]: m for m in w["volumeMounts"]}
    wdirs = {v["name"]: v["hostPath"] for v in worker["volumes"] if "hostPath" in v}
    (name, hp), = wdirs.items()
    assert hp["path"] == host_dirs["socket-dir"] and hp["type"] == "Directory"
    assert wmounts[name]["mountPath"] == os.path.dirname(socket_path) and wmounts[name]["readOnly"]
    assert str(w["securityContext"]["runAsUser"]) in flags(args, "allow-uid")
    assert flags(args, "socket-mode") == ["666"]
    for spec in (c, w):   # each has a /dev/shm of its own, in memory
        assert any(m["mountPath"] == "/dev/shm" for m in spec["volumeMounts"])

    # The image's user is the coordinator's uid, and owns the socket directory.
    user = re.search(r"^USER (\d+):(\d+)$", CONTAINERFILE.read_text(), re.M)
    assert user is not None
    assert (c["securityContext"]["runAsUser"], c["securityContext"]["runAsGroup"]) == \
        (int(user[1]), int(user[2]))
    assert f"chown {user[1]}:{user[2]} {os.path.dirname(socket_path)}" in \
        " ".join(coord["initContainers"][0]["command"])

    # The stable-page cap fits the memory limit with room for the rest.
    cap = int(flags(args, "set")[0].split("=", 1)[1])
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert cap * 4096 + 128 * 2**20 <= int(limit[:-2]) * 2**30
    compile(w["args"][0], "worker-example.yaml", "exec")


def test_k8s_manifests_validate_against_the_schemas() -> None:
    pytest.importorskip("kubernetes_validate")
    exe = shutil.which("kubernetes-validate")
    if exe is None:
        pytest.skip("kubernetes-validate is not on PATH")
    r = subprocess.run([exe, "--strict", *map(str, K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_k8s_coordinator_runs_with_the_manifests_arguments(socket_dir: str) -> None:
    args = pod_spec(manifests()["DaemonSet"])["containers"][0]["args"]
    path = os.path.join(socket_dir, "node.sock")
    args = [f"--socket={path}" if a.startswith("--socket=") else a for a in args]
    coord = Coordinator(path, args=args)
    try:
        assert coord.stats()["max_kernel_pages"] == 196608
        assert os.stat(path).st_mode & 0o777 == 0o666
    finally:
        coord.close()


def unit(path: Path) -> dict[str, str]:
    """key=value lines of a unit file (the last one wins)."""
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_socket_unit_listens_where_the_service_serves() -> None:
    service, socket_unit = unit(SERVICE), unit(SOCKET)
    argv = shlex.split(service["ExecStart"])
    assert argv[argv.index("--socket") + 1] == socket_unit["ListenSequentialPacket"]
    assert service["User"] == socket_unit["SocketUser"] == "shmdedup"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    exe = shutil.which("shmdedup") or sys.executable
    for src in (SERVICE, SOCKET):
        text = src.read_text().replace("/usr/local/bin/shmdedup", exe)
        (tmp_path / src.name.replace("@.", "@default.")).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(tmp_path / "shmdedup@default.service"), str(tmp_path / "shmdedup@default.socket")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Unknown" not in r.stderr and "ignoring" not in r.stderr, r.stderr


def test_service_command_line_serves_on_the_passed_socket(socket_dir: str) -> None:
    """ExecStart, with the example SHMDEDUP_ARGS of the unit's comment, run
    the way the socket unit runs it: the socket passed at fd 3."""
    from tests.integration.test_socket_activation import listening, passing, same_socket
    service = SERVICE.read_text()
    example = re.search(r"^#\s+SHMDEDUP_ARGS=(.*)$", service, re.M)
    assert example is not None
    path = os.path.join(socket_dir, "default.sock")
    argv = shlex.split(unit(SERVICE)["ExecStart"].replace("/run/shmdedup/%i.sock", path)
                       .replace("$SHMDEDUP_ARGS", example[1]))
    assert argv[:2] == ["/usr/local/bin/shmdedup", "coordinator"]
    listener = listening(path)
    coord = Coordinator(path, passing(listener), args=argv[4:] if argv[2] == "--socket" else argv[2:],
                        pass_fds=(listener.fileno(),))
    try:
        assert coord.stats()["max_kernel_pages"] == 196608
        assert same_socket(coord.host_pid, 3, listener)
    finally:
        coord.close()
        listener.close()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_containerfile_lints() -> None:
    r = subprocess.run(["hadolint", str(CONTAINERFILE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
