"""The ``shmdedup`` command: coordinator, stats, set, top, demo.

``shmdedup stats`` prints one ``name:value`` per line, like
``grep . /sys/kernel/mm/ksm/*``; ``--json`` prints one JSON object.

Every argument is checked by argparse (type functions) before anything is
done, so a usage error always exits 2 and nothing else does; the other exit
statuses are in ``EXIT_STATUS`` (and ``shmdedup --help``, docs/guide.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

from shmdedup import __version__
from shmdedup.errors import CoordinatorUnavailableError, Error


# Exit statuses (documented in EXIT_STATUS, docs/guide.md).
EXIT_OK = 0
EXIT_FAILURE = 1        # a runtime failure: socket or metrics port in use, a refused request
EXIT_USAGE = 2          # argparse's: a bad option or value, found before anything is done
EXIT_UNAVAILABLE = 3    # no coordinator answers (like an LSB init script's "status": not running)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_STATUS = """\
exit status:
  0    success
  1    failure: the socket or the metrics port in use, a refused request, ...
  2    usage error: a bad option or value (nothing was done)
  3    no coordinator answers at the socket
  130  interrupted by Ctrl-C (the coordinator and top stop cleanly and exit 0)"""

EXIT_STATUS_SHORT = ("exit status: 0 success, 1 failure, 2 usage error, 3 no coordinator answers,\n"
                     "130 Ctrl-C (see shmdedup --help)")

# One line per control for `shmdedup set --help` (README and docs/guide.md say more).
CONTROL_HELP = {
    "run": "0 stop, 1 merge, 2 stop and unmerge everything (keeping the advice)",
    "pages_to_scan": "advised pages per batch; setting it switches the advisor off",
    "sleep_millisecs": "milliseconds between batches",
    "advisor_mode": "1: derive pages_to_scan from what each full scan cost; 0: manual",
    "advisor_target_scan_time": "seconds one full scan should take (advisor)",
    "advisor_max_cpu": "percent of one CPU the coordinator may use (advisor)",
    "advisor_min_pages_to_scan": "lower bound of the advisor's pages_to_scan",
    "advisor_max_pages_to_scan": "upper bound of the advisor's pages_to_scan",
    "smart_scan": "1: skip pages that keep failing to merge for 1, 2, 4, 8 full scans",
    "max_page_sharing": "most worker pages mapped to one stable page",
    "max_kernel_pages": "most stable pages (0: no limit)",
    "use_zero_pages": "1: map zero pages to anonymous read-only memory, no stable page",
    "merge_zero_pages_only": "1: merge all-zero pages only, never create a stable page",
    "max_connections": "connections beyond it are closed at accept",
    "max_regions_per_worker": "a worker's registrations past it are refused",
    "max_pages_per_worker": "a worker's registrations past it (in pages) are refused",
    "max_msgs_per_sec": "per-connection message rate; a faster peer is disconnected",
    "max_msgs_burst": "per-connection message burst",
    "max_mappings": "most mappings a worker may reach through merges (default: 3/4 of "
                    "vm.max_map_count)",
    "inline_keep_millisecs": "milliseconds a stable page made by merge_now is kept for its only "
                             "sharer before the give-back rule applies",
    "max_connections_per_uid": "connections one uid other than the coordinator's may hold",
    "max_regions_per_uid": "regions one uid other than the coordinator's may register",
    "max_pages_per_uid": "pages one uid other than the coordinator's may register",
    "max_fds": "descriptors the coordinator may hold for peers (0: from RLIMIT_NOFILE)",
    "max_fds_per_uid": "descriptors held for one uid other than the coordinator's (0: a quarter "
                       "of max_fds)",
}


def controls_help() -> str:
    """The controls with their defaults and ranges, for ``set --help``."""
    from shmdedup.controls import CONTROLS
    lines = ["controls (NAME = default, and the range of values):"]
    for name, (default, lo, hi) in CONTROLS.items():
        lines.append(f"  {name} = {default}  (range {lo}..{hi})")
        if name in CONTROL_HELP:
            lines.append(textwrap.fill(CONTROL_HELP[name], 78, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
    return "\n".join(lines)


def _parse_assignment(text: str) -> tuple[str, int]:
    """NAME=VALUE with a known control name and a value in its range."""
    from shmdedup.controls import CONTROLS, check_control
    from shmdedup.errors import ControlError
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    _, lo, hi = CONTROLS.get(name, (0, 0, 0))
    try:
        try:
            number = int(value, 0)
        except ValueError:
            check_control(name, lo)  # an unknown name is the first thing to say
            raise ControlError(f"{name}: value must be an integer between {lo} and {hi}, "
                               f"got {value!r}") from None
        return name, check_control(name, number)
    except ControlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_between(lo: int, hi: int, what: str = "", why: str = "") -> Callable[[str], int]:
    """An argparse type: a decimal integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"expected {what or 'an integer'} between {lo} and {hi}{why}, got {text!r}")
        return value
    return parse


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


def _parse_socket(text: str) -> str:
    from shmdedup.protocol import _SUN_PATH_MAX
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a socket path, got {text!r}")
    if len(os.fsencode(text)) > _SUN_PATH_MAX:
        raise argparse.ArgumentTypeError(f"socket path longer than {_SUN_PATH_MAX} bytes, "
                                         f"the most AF_UNIX takes: {text}")
    return text


def _parse_domain(text: str) -> str:
    from shmdedup.protocol import _DOMAIN_RE
    if not _DOMAIN_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"a domain name matches [A-Za-z0-9_.-]{{1,64}} and does not "
                                         f"start with '.', got {text!r}")
    return text


def format_stats(stats: Mapping[str, Any]) -> str:
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
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="shmdedup coordinator[%(process)d]: %(message)s")
    log = logging.getLogger("shmdedup.coordinator")
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
    # Its memory follows the pages it tracks: temporaries of a few MiB (stats,
    # budget recounts) go back to the kernel when freed instead of staying in
    # malloc's heap (~6 MB at 4 x 1 GiB; docs/deploy.md).
    from shmdedup._shm import fix_mmap_threshold
    fix_mmap_threshold(256 << 10)
    path = args.socket or resolve_socket_path(None, args.domain)
    if args.parent_pid is not None:
        # Checked before the socket exists (the server checks too, after listening).
        from shmdedup.coordinator.peers import _open_pidfd
        pidfd = _open_pidfd(args.parent_pid)
        if pidfd is None:
            raise Error(f"parent process {args.parent_pid} is gone")
        os.close(pidfd)
    # A stop signal that arrives while the server is being built stops it as
    # soon as it exists: its socket is removed either way.
    server: CoordinatorServer | None = None
    stopped_by: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        if server is not None:
            server.stop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        server = CoordinatorServer(path, dict(args.set or []), set(args.allow_uid or ()),
                                   set(args.allow_gid or ()), args.socket_mode,
                                   metrics_port=args.metrics_port, parent_pid=args.parent_pid)
    except OSError as e:
        # bind() and chmod() errors do not name the socket; ours (Error, e.g.
        # the metrics port's) and those without an errno say what they are.
        if not isinstance(e, Error) and e.errno is not None and e.filename is None \
                and path not in str(e):
            e.filename = path
        raise
    if stopped_by:
        server.stop()
    print(f"shmdedup coordinator listening on {path}", file=sys.stderr, flush=True)
    if server.metrics is not None:
        print(f"shmdedup coordinator serving metrics on {server.metrics.url}", file=sys.stderr, flush=True)
    if args.set:
        log.info("controls set at start: %s", ", ".join(f"{k}={v}" for k, v in args.set))
    server.serve(wake_on_signals=True)
    log.info("stopped%s", f" by {stopped_by[0]}" if stopped_by else "")
    return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from shmdedup.paths import resolve_socket_path
    from shmdedup.tools.client import Client
    path = resolve_socket_path(args.socket, args.domain)
    try:
        return Client(path)
    except OSError as e:   # e.g. EACCES: say which socket
        if not isinstance(e, Error) and e.filename is None:
            e.filename = path
        raise


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        stats = c.stats()
    print(json.dumps(stats, sort_keys=True) if args.json else format_stats(stats))
    return EXIT_OK


def _cmd_set(args: argparse.Namespace) -> int:
    # Every assignment was checked by argparse before any is applied.
    with _client(args) as c:
        for name, value in args.assignments:
            c.set(name, value)
    return EXIT_OK


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


DEMO_MAX_WORKERS = 128
DEMO_MAX_MIB = 1 << 20


def _cmd_demo(args: argparse.Namespace) -> int:
    from shmdedup.tools.demo import run_demo
    # Every worker's region is written whole before merging starts, and the
    # stable pages come on top: check /dev/shm has room (a full /dev/shm ends
    # a worker with SIGBUS) before starting anything.
    need = (args.workers + 1) * args.mib
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize >> 20
    if need > free:
        raise Error(f"the demo needs about {need} MiB in /dev/shm ({args.workers} workers x "
                    f"{args.mib} MiB, plus the stable pages) and {free} MiB are free: "
                    f"use a smaller --mib or fewer --workers")
    return run_demo(workers=args.workers, mib=args.mib, as_json=args.json)


def _hint(args: argparse.Namespace) -> str:
    where = (f" --socket {shlex.quote(args.socket)}" if args.socket else
             f" --domain {shlex.quote(args.domain)}" if args.domain else "")
    return f"shmdedup: is a coordinator running? Start one with: shmdedup coordinator{where}"


def _message(e: BaseException) -> str:
    """One line for an error: an OSError without its "[Errno N]" prefix."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    return str(e)


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="shmdedup", formatter_class=raw,
        description="Kernel Samepage Merging for POSIX shared memory.\n\n"
                    "Every command finds its coordinator at --socket PATH, else at $SHMDEDUP_SOCKET\n"
                    "(unless --domain is given), else at the per-user socket of the domain\n"
                    "(--domain, default \"default\").",
        epilog=EXIT_STATUS + "\n\nThe user guide is docs/guide.md.")
    p.add_argument("--version", action="version", version=f"shmdedup {__version__}")
    sub = p.add_subparsers(dest="command", title="commands", required=True)

    def command(name: str, help: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=raw,
                              epilog=(epilog + "\n\n" if epilog else "") + EXIT_STATUS_SHORT)

    def target(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--socket", type=_parse_socket, metavar="PATH",
                       help="coordinator socket (default: $SHMDEDUP_SOCKET or the per-user path)")
        g.add_argument("--domain", type=_parse_domain, metavar="NAME",
                       help="domain name for the per-user socket path (default: default)")

    c = command("coordinator", "run a coordinator in the foreground",
                "It stops cleanly (exit status 0, socket removed) on SIGTERM, SIGINT (Ctrl-C)\n"
                "or SIGHUP.")
    target(c)
    c.add_argument("--set", action="append", type=_parse_assignment, metavar="NAME=VALUE",
                   help="initial control value (repeatable; `shmdedup set --help` lists them)")
    c.add_argument("--allow-uid", action="append", type=_parse_id, metavar="UID",
                   help="also serve peers running as this uid (repeatable; default: our uid only)")
    c.add_argument("--allow-gid", action="append", type=_parse_id, metavar="GID",
                   help="also serve peers whose primary gid is this (repeatable)")
    c.add_argument("--socket-mode", type=_parse_mode, default=0o600, metavar="OCTAL",
                   help="permissions of the socket file (default 600; e.g. 666 with --allow-uid)")
    c.add_argument("--dumpable", action="store_true",
                   help="stay dumpable (ptrace-able by our uid); default: PR_SET_DUMPABLE 0")
    c.add_argument("--parent-pid", type=_int_between(1, 1 << 22, "a process id"), metavar="PID",
                   help="stop when this process exits (how Coordinator(process=True) runs it)")
    c.add_argument("--metrics-port", type=_int_between(0, 65535, "a TCP port"), metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: a free port; "
                        "needs the prometheus extra)")
    c.add_argument("-v", "--verbose", action="count", default=0,
                   help="log connections, disconnections, full scans (at most one line a "
                        "second) and control changes to stderr; -vv: every full scan")
    c.set_defaults(func=_cmd_coordinator)

    s = command("stats", "print statistics and controls",
                "One name:value line each (workers/PID/name:value per worker), like\n"
                "`grep . /sys/kernel/mm/ksm/*`; --json prints one JSON object.")
    target(s)
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=_cmd_stats)

    st = command("set", "set controls, e.g. shmdedup set run=1 pages_to_scan=1000",
                 controls_help() + "\n\nAll are checked before any is applied.")
    target(st)
    st.add_argument("assignments", nargs="+", type=_parse_assignment, metavar="NAME=VALUE",
                    help="a control and its new value (see below)")
    st.set_defaults(func=_cmd_set)

    tp = command("top", "live view of statistics, controls, workers and memory saved",
                 "q or Ctrl-C quits; Ctrl-L repaints. If no coordinator answers, it keeps\n"
                 "retrying.")
    target(tp)
    tp.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                    help="refresh interval (default 1; 0.05 to 3600)")
    tp.set_defaults(func=_cmd_top)

    d = command("demo", "N workers with the same data, merged two ways: the peak and the memory saved",
                "N worker processes, each building MIB of mostly the same data, merged two ways\n"
                "side by side: by scanning (each worker writes its copy, the scan merges them)\n"
                "and at write time (each block merged as soon as it is written). It prints the\n"
                "peak while the workers build their data and the end state of each way,\n"
                "measured from outside (the shm objects' allocated blocks, /proc/meminfo).")
    d.add_argument("--workers", type=_int_between(2, DEMO_MAX_WORKERS, why=" (merging needs two copies)"),
                   default=4, metavar="N", help="worker processes (default 4)")
    d.add_argument("--mib", type=_int_between(1, DEMO_MAX_MIB), default=64, metavar="MIB",
                   help="MiB of shared memory per worker (default 64)")
    d.add_argument("--json", action="store_true", help="print the result as one JSON object")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit status (see EXIT_STATUS)."""
    args = build_parser().parse_args(argv)   # exits 2 on a usage error
    try:
        try:
            func: Callable[[argparse.Namespace], int] = args.func
            return func(args)
        finally:
            sys.stdout.flush()
    except CoordinatorUnavailableError as e:
        print(f"shmdedup: {_message(e)}", file=sys.stderr)
        print(_hint(args), file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BrokenPipeError:
        # The reader went away (`shmdedup stats | head -1`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except (Error, OSError) as e:  # e.g. a coordinator already listening there: a message, not a traceback
        print(f"shmdedup: {_message(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main"]
