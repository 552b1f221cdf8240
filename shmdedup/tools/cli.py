"""The ``shmdedup`` command: coordinator, stats, set, top, demo.

``shmdedup stats`` prints one ``name:value`` per line, like
``grep . /sys/kernel/mm/ksm/*``; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from shmdedup.errors import Error


def _parse_assignment(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: value must be an integer, got {value!r}") from None


def _parse_id(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a numeric id, got {text!r}") from None
    if not 0 <= value < 2**32 - 1:
        raise argparse.ArgumentTypeError(f"id out of range: {value}")
    return value


def _parse_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode like 600, got {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text}")
    return value


def format_stats(stats: dict[str, Any]) -> str:
    lines = []
    for k in sorted(stats):
        if k not in ("workers", "uids"):
            lines.append(f"{k}:{stats[k]}")
    for w in stats.get("workers", []):
        for k in sorted(w):
            if k != "pid":
                lines.append(f"workers/{w['pid']}/{k}:{w[k]}")
    for u in stats.get("uids", []):
        for k in sorted(u):
            if k != "uid":
                lines.append(f"uids/{u['uid']}/{k}:{u[k]}")
    return "\n".join(lines)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from shmdedup.paths import resolve_socket_path
    from shmdedup.coordinator.server import CoordinatorServer
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="shmdedup coordinator[%(process)d]: %(message)s")
    from shmdedup.coordinator.security import set_dumpable
    # Non-dumpable: same-uid processes must not ptrace us, write our memory or
    # open our fds (the writable stable segment) through /proc
    # (docs/security.md).  --dumpable sets it explicitly, since a change of
    # uid on the way here would have cleared it.
    set_dumpable(args.dumpable)
    # A process of its own: room for every peer's descriptors (quotas.py); an
    # embedded coordinator leaves its application's limit alone.
    from shmdedup.coordinator.quotas import raise_nofile_limit
    raise_nofile_limit()
    path = args.socket or resolve_socket_path(None, args.domain)
    try:
        server = CoordinatorServer(path, dict(args.set or []), set(args.allow_uid or ()),
                                   set(args.allow_gid or ()), args.socket_mode,
                                   metrics_port=args.metrics_port, parent_pid=args.parent_pid)
    except OSError as e:
        if e.filename is None and path not in str(e):
            e.filename = path  # bind() errors do not name the socket
        raise
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: server.stop())
    print(f"shmdedup coordinator listening on {path}", file=sys.stderr, flush=True)
    if server.metrics is not None:
        print(f"shmdedup coordinator serving metrics on {server.metrics.url}", file=sys.stderr, flush=True)
    server.serve()
    return 0


def _client(args: argparse.Namespace) -> Any:
    from shmdedup.tools.client import Client
    return Client(args.socket, domain=args.domain)


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        stats = c.stats()
    print(json.dumps(stats, sort_keys=True) if args.json else format_stats(stats))
    return 0


def _cmd_set(args: argparse.Namespace) -> int:
    from shmdedup.controls import check_control
    for name, value in args.assignments:
        check_control(name, value)  # all checked before any is applied
    with _client(args) as c:
        for name, value in args.assignments:
            c.set(name, value)
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from shmdedup.tools.top import run_top
    return run_top(args.socket, domain=args.domain, interval=args.interval)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 3600 seconds, got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from shmdedup.tools.demo import run_demo
    return run_demo(workers=args.workers, mib=args.mib, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shmdedup", description="Kernel Samepage Merging for POSIX shared memory")
    sub = p.add_subparsers(dest="cmd", required=True)

    def target(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--socket", help="coordinator socket (default: $SHMDEDUP_SOCKET or the per-user path)")
        sp.add_argument("--domain", help="domain name for the per-user socket path (default: default)")

    c = sub.add_parser("coordinator", help="run a coordinator in the foreground")
    target(c)
    c.add_argument("--set", action="append", type=_parse_assignment, metavar="NAME=VALUE",
                   help="initial control value (repeatable)")
    c.add_argument("--allow-uid", action="append", type=_parse_id, metavar="UID",
                   help="also serve peers running as this uid (repeatable; default: our uid only)")
    c.add_argument("--allow-gid", action="append", type=_parse_id, metavar="GID",
                   help="also serve peers whose primary gid is this (repeatable)")
    c.add_argument("--socket-mode", type=_parse_mode, default=0o600, metavar="OCTAL",
                   help="permissions of the socket file (default 600; e.g. 666 with --allow-uid)")
    c.add_argument("--dumpable", action="store_true",
                   help="stay dumpable (ptrace-able by our uid); default: PR_SET_DUMPABLE 0")
    c.add_argument("--parent-pid", type=int, metavar="PID",
                   help="stop when this process exits (how Coordinator(process=True) runs it)")
    c.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: a free port; "
                        "needs the prometheus extra)")
    c.add_argument("-v", "--verbose", action="store_true")
    c.set_defaults(func=_cmd_coordinator)

    s = sub.add_parser("stats", help="print statistics and controls")
    target(s)
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=_cmd_stats)

    st = sub.add_parser("set", help="set controls, e.g. shmdedup set run=1 pages_to_scan=1000")
    target(st)
    st.add_argument("assignments", nargs="+", type=_parse_assignment, metavar="NAME=VALUE")
    st.set_defaults(func=_cmd_set)

    tp = sub.add_parser("top", help="live view of statistics, controls, workers and memory saved")
    target(tp)
    tp.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                    help="refresh interval (default 1)")
    tp.set_defaults(func=_cmd_top)

    d = sub.add_parser("demo", help="N workers with the same data; show the memory saved")
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--mib", type=int, default=64, help="MiB per worker")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_demo)

    args = p.parse_args(argv)
    try:
        return args.func(args)
    except Error as e:
        print(f"shmdedup: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a coordinator already listening there: a message, not a traceback
        print(f"shmdedup: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
