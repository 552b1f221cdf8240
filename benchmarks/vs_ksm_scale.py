"""vs_ksm's scaling and out-of-the-box modes (``benchmarks/vs_ksm.py`` is the entry point).

    python benchmarks/vs_ksm.py --scaling          # 1..64 workers, 64 MiB..8 GiB in all
    python benchmarks/vs_ksm.py --scaling-quick    # small rows only
    python benchmarks/vs_ksm.py --defaults         # no control set, advisor on, vs ksmd's defaults

Both use vs_ksm.py's workers, content, convergence rule and KSM handling
(``KSM.restore`` puts /sys/kernel/mm/ksm back however a run ends); the two
systems run one after the other, never at the same time.

``--scaling``: rows of N workers x M MiB, among them 8 x 1 GiB and 64 x 32 MiB,
each system at ``--pages-to-scan`` / ``--sleep-ms`` (KSM: anonymous memory +
MADV_MERGEABLE).  Workers are started and filled (and, for shmdedup, every
region registered) before the clock starts at run=1.  Per row and system: time
to 95% (and 100%) of the expected pages_sharing, the scanner's and the
workers' CPU until 95%, their sum per advised page (time per page too, to see
linearity in pages), the drop of the workers' Pss.  For shmdedup also the
round trip of a ``stats`` request from this script (a control connection,
the same one convergence is polled through, every --poll seconds): median
with the scanner stopped before run=1, then median / 99th percentile / worst
during convergence.  A stats reply also carries one line per worker, so part
of its cost grows with the number of peers by itself; the idle median shows
that part, the rest is the coordinator's event loop being busy elsewhere.

``--defaults``: 4 x 256 MiB (--workers/--mib).  shmdedup: a coordinator
process with no control given; it is started stopped (run=0) and set to
run=1, its default, once every region is registered: no other control is
touched, the scan-time advisor is on.  Its defaults (target scan time, CPU
cap) are read from ``shmdedup.controls.CONTROLS``.  Reported: time to 95% /
100% vs the target scan time, the coordinator's CPU (% of one CPU) over the
convergence and in its worst 1-s window vs ``advisor_max_cpu``, then, once
converged with nothing changing, its CPU from the next full-scan end to the
first full-scan end >= --steady-seconds later, per tracked page per second;
then, since the advisor is still lowering pages_to_scan at that point, the
same again once a full scan changed pages_to_scan by < 5% ("settled";
``--py-spy FILE`` profiles the coordinator during that window); then
"unwatched": a whole number of full scans with no request at all, CPU from
/proc (each request wakes the coordinator, and a wakeup costs it more than
the request's own CPU).  A stats
request costs the coordinator CPU in proportion to its tracked pages, so the
windows are watched through stats requests every 2 s (not ``wait`` requests:
a wait wakes a quiet domain's scan to the advisor's pace), and the measured
CPU of the stats requests in a window is taken out.  KSM: ksmd at its own defaults (pages_to_scan 100, sleep_millisecs
20) on the same content (--defaults-ksm-mib for a smaller size): time to
converge, then its steady CPU per tracked page per second over the same kind
of window (at 5000 pages/s a full scan of 4 x 256 MiB takes ~52 s, so the
window is at least one whole scan).  Last, both get a late worker (one more
with worker 0's bytes, vs_ksm.late_worker): the time until 95% of its pages
merged onto the stable pages already there, at each system's own pace.  The
coordinator runs at the default nice (0) in this mode, not ksmd's.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import subprocess
import time
from typing import Any, Callable

import numpy as np

import host
import vs_ksm as vk

SCALING_ROWS = [(1, 64), (4, 64), (8, 64), (4, 256), (4, 1024), (8, 1024), (64, 32)]
SCALING_QUICK_ROWS = [(1, 64), (2, 64), (4, 64), (4, 256)]


# --------------------------------------------------------------------------
# --scaling


def _row(cfg: argparse.Namespace, workers: int, mib: int) -> dict[str, Any]:
    vk._check_memory(workers, mib)
    out: dict[str, Any] = {"workers": workers, "mib": mib, "pages": workers * mib * vk.MIB // vk.PAGE,
                           "loadavg_before": os.getloadavg()[0]}
    for system, run in (("ksm", vk.run_ksm), ("shmdedup", vk.run_shmdedup)):
        if cfg.only not in (None, system):
            continue
        r = run(cfg, workers, mib, False)
        if r.get("cpu95_ns") is not None:
            r["scanner_cpu95_s"] = r["cpu95_ns"] / 1e9
            r["worker_cpu95_s"] = r["wcpu95_ns"] / 1e9
            r["us_per_page95"] = (r["cpu95_ns"] + r["wcpu95_ns"]) / 1e3 / out["pages"]
            r["t95_us_per_page"] = r["t95_s"] * 1e6 / out["pages"]
        vk._finish(r)
        rtt = r.pop("stats_rtt_s", None)
        if rtt:
            idle, conv = np.array(rtt["idle"]) * 1e3, np.array(rtt["converge"]) * 1e3
            r["stats_rtt_ms"] = {
                "idle_median": float(np.median(idle)) if len(idle) else None,
                "median": float(np.median(conv)) if len(conv) else None,
                "p99": float(np.percentile(conv, 99)) if len(conv) else None,
                "max": float(conv.max()) if len(conv) else None, "samples": len(conv)}
        out[system] = r
    out["loadavg_after"] = os.getloadavg()[0]
    return out


def _system_table(rows: list[dict[str, Any]], system: str) -> str:
    sd = system == "shmdedup"
    head = (f"{'workers':>7} {'MiB':>5} {'pages':>8} | {'t95 s':>7} {'t100 s':>7} {'us/page':>7} | "
            f"{'scan CPU':>8} {'wrk CPU':>7} {'CPU us/pg':>9} {'us/mrg':>6} | {'saved':>7} {'ideal':>7} | {'other':>5} {'load':>5}")
    if sd:
        head += f" | {'rtt idle':>8} {'med':>6} {'p99':>6} {'max':>7} {'n':>4} | {'stats ms':>8} {'poll s':>6}"
    lines = [head, "-" * len(head)]
    for row in rows:
        r = row.get(system)
        if r is None:
            continue
        line = (f"{row['workers']:>7} {row['mib']:>5} {row['pages']:>8} | {vk._fmt(r.get('t95_s')):>7} "
                f"{vk._fmt(r.get('t100_s')):>7} {vk._fmt(r.get('t95_us_per_page'), 2):>7} | "
                f"{vk._fmt(r.get('scanner_cpu95_s')):>8} {vk._fmt(r.get('worker_cpu95_s')):>7} "
                f"{vk._fmt(r.get('us_per_page95')):>9} {vk._fmt(r.get('us_per_merged_page')):>6} | "
                f"{vk._fmt(r.get('saved_pss_mib'), 1):>7} "
                f"{vk._fmt(r.get('ideal_saved_mib'), 1):>7} | {vk._fmt(r.get('foreign_cpu_s'), 1):>5} "
                f"{row['loadavg_before']:>5.2f}")
        if sd:
            q = r.get("stats_rtt_ms") or {}
            line += (f" | {vk._fmt(q.get('idle_median')):>8} {vk._fmt(q.get('median')):>6} "
                     f"{vk._fmt(q.get('p99')):>6} {vk._fmt(q.get('max')):>7} {q.get('samples', 0):>4} | "
                     f"{vk._fmt(r.get('stats_cpu_ms')):>8} {vk._fmt(r.get('stats_polling_cpu_s')):>6}")
        if r.get("plateau"):
            line += "  (plateau)"
        lines.append(line)
    return "\n".join(lines)


def _ratio_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'workers':>7} {'MiB':>5} | {'t95 shmd/KSM':>12} {'CPU95 shmd/KSM':>14} {'saved shmd/KSM':>14}"
    lines = [head, "-" * len(head)]
    for row in rows:
        k, s = row.get("ksm"), row.get("shmdedup")
        lines.append(f"{row['workers']:>7} {row['mib']:>5} | "
                     f"{vk._ratio(vk._get(s, 't95_s'), vk._get(k, 't95_s')):>12} "
                     f"{vk._ratio(vk._get(s, 'us_per_page95'), vk._get(k, 'us_per_page95')):>14} "
                     f"{vk._ratio(vk._get(s, 'saved_pss_mib'), vk._get(k, 'saved_pss_mib')):>14}")
    return "\n".join(lines)


def scaling(cfg: argparse.Namespace, result: dict[str, Any]) -> None:
    rows = []
    for workers, mib in (SCALING_QUICK_ROWS if cfg.scaling_quick else SCALING_ROWS):
        host.say(f"== scaling: {workers} workers x {mib} MiB (load average {os.getloadavg()[0]:.2f})")
        rows.append(_row(cfg, workers, mib))
    result["scaling"] = rows


def print_scaling(cfg: argparse.Namespace, result: dict[str, Any]) -> None:
    rows = result["scaling"]
    print(f"\nscaling: pages_to_scan {cfg.pages_to_scan}, sleep {cfg.sleep_ms} ms, unique {cfg.unique}, "
          f"zero {cfg.zero}, volatile {cfg.volatile}{', scattered' if cfg.scattered else ''}; "
          f"kernel {result['environment']['kernel']}, {result['environment']['cpus']} CPUs.\n"
          f"t95/t100 s from run=1 (workers already started); us/page = t95 per advised page (us); "
          f"scan CPU / wrk CPU = scanner (ksmd / coordinator) and workers' CPU s until 95%; "
          f"CPU us/pg = their sum per advised page; us/mrg = scanner + workers' CPU until 100% per "
          f"page merged (pages_sharing); saved = drop of the workers' Pss (MiB); "
          f"other = CPU s of other processes during the convergence; load = 1-min load average "
          f"before the row.\nshmdedup rtt = stats request round trip (ms) from a control "
          f"connection: idle median (run=0, before), then median / p99 / max of n samples during "
          f"convergence; stats ms = the coordinator's CPU per stats request once converged, "
          f"poll s = that x the requests made while converging: an upper bound of the polling's "
          f"share of scan CPU (early requests are cheaper: a stats request counts every tracked "
          f"page's status).")
    for system in ("ksm", "shmdedup"):
        if any(system in r for r in rows):
            print(f"\n{'KSM' if system == 'ksm' else 'shmdedup'}:")
            print(_system_table(rows, system))
    busy = [(row, system) for row in rows for system in ("ksm", "shmdedup")
            if row.get(system) and row[system].get("foreign_cpu_s", 0) > 0.2 * row[system].get("end_s", 0)]
    if busy:
        print("\nrows where other processes used more than 0.2 CPUs during the convergence "
              "(the top CPU users meanwhile, among processes alive at its end, not ours: command, pid, CPU s):")
        for row, system in busy:
            r = row[system]
            print(f"  {system} {row['workers']} x {row['mib']}: other {r['foreign_cpu_s']:.1f} CPU s in "
                  f"{r['end_s']:.1f} s; top {[(c, p, round(t, 1)) for c, p, t in r.get('top_cpu', [])]}")
    if all("ksm" in r and "shmdedup" in r for r in rows):
        print("\nratios (CPU95 = CPU per advised page until 95%):")
        print(_ratio_table(rows))
    print(f"\nload average at the end: {os.getloadavg()}")


# --------------------------------------------------------------------------
# --defaults


def _cpu_windows(timeline: list[tuple[float, int]], window: float = 1.0) -> float | None:
    """Worst CPU share (of one CPU) over any `window` s of (time, cpu ns) samples."""
    worst, j = None, 0
    for i in range(len(timeline)):
        while j < len(timeline) and timeline[j][0] - timeline[i][0] < window:
            j += 1
        if j == len(timeline):
            break
        share = (timeline[j][1] - timeline[i][1]) / 1e9 / (timeline[j][0] - timeline[i][0])
        worst = share if worst is None else max(worst, share)
    return worst


STEADY_POLL = 2.0      # s between two stats requests while shmdedup's steady windows wait for scans


def _steady(sample: Callable[[], dict[str, Any]], wait_scans: Callable[[int, float], int | None], tracked: int,
            seconds: float, timeout: float, scan_s: float | None = None,
            probe_ns: float = 0.0) -> dict[str, Any]:
    """Scanner CPU from a full-scan end to the first full-scan end >= seconds
    later.  With *scan_s* (s per full scan) it waits for half of them at once,
    then scan by scan; each wait makes the stats requests *wait_scans* returns
    (None: one), the last sample one more; *probe_ns* (CPU of one stats
    request) times their number is taken out of ``cpu_s``."""
    wait_scans(1, timeout)        # start on a scan boundary
    s0, t0 = sample(), time.monotonic()
    probes = 1                    # stats requests inside the window: the last sample's
    if scan_s:                    # half the window in one wait (scans lengthen as the advisor slows)
        # At most 4 scans: the one measured may be far shorter than the next
        # ones (the scan right after convergence), and 60 of 10 s each outlast
        # any timeout.
        probes += wait_scans(max(1, min(4, math.ceil(seconds / scan_s / 2))), timeout) or 1
    while time.monotonic() - t0 < seconds:
        probes += wait_scans(1, timeout) or 1
    s1, t1 = sample(), time.monotonic()
    dt = t1 - t0
    raw = (s1["cpu"] - s0["cpu"]) / 1e9
    cpu, wcpu = max(raw - probes * probe_ns / 1e9, 0.0), (s1["wcpu"] - s0["wcpu"]) / 1e9
    return {"seconds": dt, "full_scans": s1["full_scans"] - s0["full_scans"],
            "sharing_change": s1["pages_sharing"] - s0["pages_sharing"], "raw_cpu_s": raw,
            "stats_requests": probes if scan_s else 0,
            "cpu_s": cpu, "cpu_percent": 100 * cpu / dt, "worker_cpu_s": wcpu,
            "ns_per_page_per_s": cpu * 1e9 / dt / tracked,
            "worker_ns_per_page_per_s": wcpu * 1e9 / dt / tracked}


def _defaults_shmdedup(cfg: argparse.Namespace, workers: int, mib: int) -> dict[str, Any]:
    import shmdedup
    from shmdedup.controls import CONTROLS
    npages = mib * vk.MIB // vk.PAGE
    _, counts = vk.make_layout(npages, cfg.unique, cfg.zero, cfg.volatile, cfg.scattered)
    defaults = {k: v[0] for k, v in CONTROLS.items()}
    expected = vk.expected_sharing(workers, counts, defaults["max_page_sharing"])
    res: dict[str, Any] = {"system": "shmdedup", "workers": workers, "mib": mib, "tracked": workers * npages,
                           "expected_sharing": expected,
                           "target_scan_time_s": defaults["advisor_target_scan_time"],
                           "max_cpu_percent": defaults["advisor_max_cpu"]}
    coord = shmdedup.Coordinator(process=True, run=0)      # run=1 (its default) once registered
    fleet = None
    try:
        coord.start()
        cpid = coord.pid
        client = coord.client()
        st = client.stats()
        res["controls_not_default"] = {k: st[k] for k in defaults  # type: ignore[literal-required]
                                       if k != "run" and st.get(k) != defaults[k]}
        host.say(f"shmdedup defaults: starting {workers} workers x {mib} MiB ...")
        fleet = vk.Fleet("shmdedup", workers, npages, vars(cfg), cfg.timeout)
        t0 = time.monotonic()
        while True:
            regs = [w for w in client.stats()["workers"] if w["pid"] in fleet.pids]
            if len(regs) == workers and sum(w["pages"] for w in regs) >= workers * npages:
                break
            if time.monotonic() - t0 > cfg.timeout:
                raise TimeoutError(f"shmdedup: only {len(regs)} of {workers} workers registered")
            time.sleep(0.02)
        timeline: list[tuple[float, int]] = []
        scans: list[tuple[float, int, int]] = []        # (t, full_scans, pages_to_scan)

        def sample() -> dict[str, Any]:
            s = client.stats()
            cpu = host.cpu_ns(cpid)
            timeline.append((time.monotonic(), cpu))
            if not scans or scans[-1][1] != s["full_scans"]:
                scans.append((time.monotonic(), s["full_scans"], s["pages_to_scan"]))
            return {"pages_sharing": s["pages_sharing"], "full_scans": s["full_scans"],
                    "pages_scanned": s["pages_scanned"], "cpu": cpu, "wcpu": fleet.cpu_ns()}

        def wait_scans(n: int, timeout: float) -> int:
            # Polled, not a ``wait`` request: a wait wakes the scan out of a
            # quiet domain's stretched pace (pacing.py), which is what the
            # steady windows measure.  Returns the stats requests made.
            f0, t0, asked = client.stats()["full_scans"], time.monotonic(), 1
            while client.stats()["full_scans"] < f0 + n:
                asked += 1
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"shmdedup: no {n} full scans within {timeout:.0f} s")
                time.sleep(STEADY_POLL)
            return asked + 1

        def probe_ns() -> float:
            """The coordinator's CPU for one stats request, now."""
            c0 = host.cpu_ns(cpid)
            for _ in range(10):
                client.stats()
            return (host.cpu_ns(cpid) - c0) / 10

        res["busy_cpus_before"] = host.wait_quiet(cfg.wait_quiet, "shmdedup")
        pss0 = fleet.pss_kib()
        res["pages_to_scan_start"] = client.stats()["pages_to_scan"]
        client.set("run", 1)
        tstart = time.monotonic()
        conv = vk.converge(sample, expected, cfg.timeout, cfg.poll, "shmdedup (defaults)", cfg.quiet)
        res.update(conv)
        res["saved_pss_mib"] = (pss0 - fleet.pss_kib()) / 1024
        res["cpu_percent"] = 100 * conv["cpu_ns"] / 1e9 / conv["end_s"]
        res["worst_1s_cpu_percent"] = (lambda w: None if w is None else 100 * w)(_cpu_windows(timeline))
        res["scans"] = [(round(t - tstart, 2), f, p) for t, f, p in scans]
        res["stats_cpu_ms"] = probe_ns() / 1e6
        wait_scans(1, cfg.timeout)
        t = time.monotonic()
        wait_scans(1, cfg.timeout)          # one whole scan: its length
        res["steady"] = _steady(sample, wait_scans, workers * npages, cfg.steady_seconds, cfg.timeout,
                                time.monotonic() - t, res["stats_cpu_ms"] * 1e6)
        res["pages_to_scan_steady"] = client.stats()["pages_to_scan"]
        # The advisor is still moving pages_to_scan then: measure again once
        # a full scan changed it by < 5% (or after --settle-seconds).
        t0, prev = time.monotonic(), client.stats()["pages_to_scan"]
        while time.monotonic() - t0 < cfg.settle_seconds:
            t = time.monotonic()
            wait_scans(1, cfg.timeout)
            scan_s = time.monotonic() - t
            cur = client.stats()["pages_to_scan"]
            if abs(cur - prev) < 0.05 * prev:
                break
            prev = cur
        res["settle_s"] = time.monotonic() - t0
        profiler = None
        if cfg.py_spy:                  # profile the settled window
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(cpid), "--rate", str(cfg.py_spy_rate), "--format", "raw",
                 "--output", cfg.py_spy] + (["--native"] if cfg.py_spy_native else ["--nonblocking"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            res["settled"] = _steady(sample, wait_scans, workers * npages, cfg.steady_seconds, cfg.timeout,
                                     scan_s, res["stats_cpu_ms"] * 1e6)
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
        # Unwatched: the windows above ask for stats every STEADY_POLL s, and
        # each request wakes the coordinator, whose first milliseconds after
        # a sleep cost several times their work (that tax is not in the
        # request's measured CPU).  Here nothing is asked for a whole number
        # of full scans: CPU from /proc, full_scans read after the window.
        per_scan = res["settled"]["seconds"] / max(1, res["settled"]["full_scans"])
        wait_scans(1, cfg.timeout)
        window = per_scan * max(2, math.ceil(cfg.steady_seconds / per_scan))
        f0, c0, t0 = client.stats()["full_scans"], host.cpu_ns(cpid), time.monotonic()
        time.sleep(window)
        c1, t1 = host.cpu_ns(cpid), time.monotonic()
        f1 = client.stats()["full_scans"]
        res["unwatched"] = {"seconds": t1 - t0, "full_scans": f1 - f0,
                            "ns_per_page_per_s": (c1 - c0) / (t1 - t0) / (workers * npages)}
        res["pages_to_scan_end"] = client.stats()["pages_to_scan"]
        # A worker that comes late, into the quiet converged domain.
        res["late"] = vk.late_worker("shmdedup", cfg, npages, counts, sample, cfg.timeout, 0.25)
        res["verify_ok"] = all(fleet.call(i, "verify") for i in range(workers))
    finally:
        vk.stop_shmdedup(coord, fleet)
    return res


def _defaults_ksm(cfg: argparse.Namespace, workers: int, mib: int) -> dict[str, Any]:
    why = host.KSM.usable()
    if why:
        raise SystemExit(f"KSM baseline impossible: {why}. Use --only shmdedup.")
    host.KSM.save()
    ksmd = host.find_ksmd()
    if ksmd is None:
        raise SystemExit("no ksmd thread found in /proc/*/comm")
    npages = mib * vk.MIB // vk.PAGE
    _, counts = vk.make_layout(npages, cfg.unique, cfg.zero, cfg.volatile, cfg.scattered)
    expected = vk.expected_sharing(workers, counts, host.KSM.read("max_page_sharing"))
    base = host.KSM.read("pages_sharing")
    res: dict[str, Any] = {"system": "ksm", "workers": workers, "mib": mib, "tracked": workers * npages,
                           "expected_sharing": expected, "pages_to_scan": 100, "sleep_millisecs": 20}
    fleet = None
    try:
        host.say(f"KSM defaults: starting {workers} workers x {mib} MiB ...")
        fleet = vk.Fleet("ksm", workers, npages, vars(cfg), cfg.timeout)
        timeline: list[tuple[float, int]] = []

        def sample() -> dict[str, Any]:
            cpu = host.cpu_ns(ksmd)
            timeline.append((time.monotonic(), cpu))
            return {"pages_sharing": host.KSM.read("pages_sharing") - base,
                    "full_scans": host.KSM.read("full_scans"), "pages_scanned": host.KSM.read("pages_scanned"),
                    "cpu": cpu, "wcpu": fleet.cpu_ns()}

        def wait_scans(n: int, timeout: float) -> None:
            f0, t0 = host.KSM.read("full_scans"), time.monotonic()
            while host.KSM.read("full_scans") < f0 + n:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"KSM: no full scan within {timeout:.0f} s")
                time.sleep(0.05)

        res["busy_cpus_before"] = host.wait_quiet(cfg.wait_quiet, "KSM")
        pss0 = fleet.pss_kib()
        host.KSM.write("pages_to_scan", 100)
        host.KSM.write("sleep_millisecs", 20)
        res["settings"] = host.KSM.settings()
        host.KSM.write("run", 1)
        conv = vk.converge(sample, expected, cfg.timeout, max(cfg.poll, 0.2), "KSM (defaults)", cfg.quiet)
        res.update(conv)
        res["saved_pss_mib"] = (pss0 - fleet.pss_kib()) / 1024
        res["cpu_percent"] = 100 * conv["cpu_ns"] / 1e9 / conv["end_s"]
        res["worst_1s_cpu_percent"] = (lambda w: None if w is None else 100 * w)(_cpu_windows(timeline))
        res["steady"] = _steady(sample, wait_scans, workers * npages, cfg.steady_seconds, cfg.timeout)
        res["unwatched"] = dict(res["steady"])      # reading sysfs never wakes ksmd
        res["late"] = vk.late_worker("ksm", cfg, npages, counts, sample, cfg.timeout, 0.25)
        res["verify_ok"] = all(fleet.call(i, "verify") for i in range(workers))
    finally:
        if fleet is not None:
            fleet.close()
        host.KSM.restore()
    return res


def defaults(cfg: argparse.Namespace, result: dict[str, Any]) -> None:
    out: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    if cfg.only in (None, "shmdedup"):
        vk._check_memory(cfg.workers, cfg.mib)
        out["shmdedup"] = _defaults_shmdedup(cfg, cfg.workers, cfg.mib)
    if cfg.only in (None, "ksm"):
        mib = cfg.defaults_ksm_mib or cfg.mib
        vk._check_memory(cfg.workers, mib)
        out["ksm"] = _defaults_ksm(cfg, cfg.workers, mib)
    out["loadavg_after"] = os.getloadavg()
    result["defaults"] = out


DEFAULT_ROWS: list[tuple[str, Any, int | None]] = [
    ("workers x MiB", lambda r: f"{r['workers']} x {r['mib']}", None),
    ("tracked pages", "tracked", 0),
    ("time to 95% (s)", "t95_s", 2),
    ("time to 100% (s)", "t100_s", 2),
    ("full scans until then", "full_scans", 0),
    ("advisor target scan time (s)", "target_scan_time_s", 0),
    ("time to 95% / target", lambda r: vk._ratio(r.get("t95_s"), r.get("target_scan_time_s")), None),
    ("time to 100% / target", lambda r: vk._ratio(r.get("t100_s"), r.get("target_scan_time_s")), None),
    ("scanner CPU s until 100%", lambda r: vk._fmt(r["cpu_ns"] / 1e9), None),
    ("scanner CPU % of a CPU, convergence", "cpu_percent", 1),
    ("  worst 1-s window", "worst_1s_cpu_percent", 1),
    ("CPU cap advisor_max_cpu (%)", "max_cpu_percent", 0),
    ("workers' CPU s until 100%", lambda r: vk._fmt(r["wcpu_ns"] / 1e9), None),
    ("memory saved MiB (workers' Pss)", "saved_pss_mib", 1),
    ("steady: window s", "steady.seconds", 1),
    ("steady: full scans in it", "steady.full_scans", 0),
    ("steady: pages_sharing change", "steady.sharing_change", 0),
    ("stats request, coordinator CPU ms", "stats_cpu_ms", 2),
    ("steady: stats requests in it", "steady.stats_requests", 0),
    ("steady: scanner CPU s (raw)", "steady.raw_cpu_s", 3),
    ("steady: scanner CPU % of a CPU", "steady.cpu_percent", 2),
    ("steady: scanner ns CPU/tracked page/s", "steady.ns_per_page_per_s", 3),
    ("steady: workers' ns CPU/page/s", "steady.worker_ns_per_page_per_s", 3),
    ("steady: s per full scan", lambda r: vk._fmt(r["steady"]["seconds"] / r["steady"]["full_scans"]), None),
    ("pages_to_scan start -> steady", lambda r: (f"{r['pages_to_scan_start']}->{r['pages_to_scan_steady']}"
                                                 if "pages_to_scan_start" in r else str(r.get("pages_to_scan"))),
     None),
    ("settled: waited s (advisor)", "settle_s", 1),
    ("settled: window s / full scans", lambda r: (f"{r['settled']['seconds']:.1f} / {r['settled']['full_scans']}"
                                                  if "settled" in r else "-"), None),
    ("settled: s per full scan", lambda r: (vk._fmt(r["settled"]["seconds"] / r["settled"]["full_scans"])
                                            if "settled" in r else "-"), None),
    ("settled: stats requests in it", "settled.stats_requests", 0),
    ("settled: scanner CPU s (raw)", "settled.raw_cpu_s", 3),
    ("settled: scanner CPU % of a CPU", "settled.cpu_percent", 2),
    ("settled: scanner ns CPU/tracked page/s", "settled.ns_per_page_per_s", 3),
    ("settled: pages_to_scan at the end", "pages_to_scan_end", 0),
    ("unwatched: window s / full scans", lambda r: (f"{r['unwatched']['seconds']:.1f} / "
                                                    f"{r['unwatched']['full_scans']}" if "unwatched" in r else "-"),
     None),
    ("unwatched: scanner ns CPU/tracked page/s", "unwatched.ns_per_page_per_s", 3),
    ("late worker: s to 95% of its pages", "late.t95_s", 1),
    ("  full scans meanwhile", "late.full_scans", 0),
    ("every worker read its bytes", "verify_ok", 0),
    ("other processes' CPU s, convergence", "foreign_cpu_s", 1),
]


def print_defaults(cfg: argparse.Namespace, result: dict[str, Any]) -> None:
    d = result["defaults"]
    k, s = d.get("ksm"), d.get("shmdedup")
    print(f"\ndefaults: kernel {result['environment']['kernel']}, {result['environment']['cpus']} CPUs; "
          f"load average before {d['loadavg_before']}, after {d['loadavg_after']}")
    if s:
        print(f"shmdedup: coordinator process, no control set (started at run=0, set to run=1, its "
              f"default, once every region was registered); controls differing from "
              f"shmdedup.controls.CONTROLS: {s['controls_not_default'] or 'none'}; nice 0")
    if k:
        print(f"KSM: ksmd at pages_to_scan 100, sleep_millisecs 20 (advisor_mode "
              f"{k['settings'].get('advisor_mode')}, smart_scan {k['settings'].get('smart_scan')})")
    print("settled (shmdedup) = the same again once a full scan changed the advisor's pages_to_scan "
          "by < 5% (waited at most --settle-seconds); ratios in that section compare with ksmd's steady window")
    print("steady = after convergence, from the next full-scan end to the first "
          f"full-scan end >= {cfg.steady_seconds:.0f} s later; CPU per tracked page per second = "
          "CPU ns / window s / tracked pages; the stats requests in shmdedup's window "
          "(its waits and the last sample: 'stats requests in it') x their measured CPU are taken out of the raw figure")
    w = max(len(r[0]) for r in DEFAULT_ROWS)
    print(f"{'':<{w}}  {'KSM':>14}  {'shmdedup':>14}  {'shmdedup/KSM':>12}")
    print("-" * (w + 46))
    for name, path, digits in DEFAULT_ROWS:
        cells: list[str] = []
        nums: list[Any] = []
        for r in (k, s):
            if r is None:
                cells.append("-")
                nums.append(None)
            elif callable(path):
                cells.append(path(r))
                nums.append(None)
            else:
                # ksmd has no advisor: its one steady window stands for both.
                v = vk._get(r, path.replace("settled.", "steady.") if r is k else path)
                cells.append(vk._fmt(v, digits or 0))
                nums.append(v)
        print(f"{name:<{w}}  {cells[0]:>14}  {cells[1]:>14}  {vk._ratio(nums[1], nums[0]):>12}")
    if s and "scans" in s:
        print("shmdedup full scans during convergence (s from run=1, full_scans, pages_to_scan set by "
              f"the advisor): {s['scans'][:12]}")
    for r in (k, s):
        if r and r.get("plateau"):
            print(f"  * {r['system']}: stopped at {r['pages_sharing']} of {r['expected_sharing']} "
                  f"pages sharing (plateau)")
    for r in (k, s):
        if r and r.get("top_cpu"):
            print(f"  * {r['system']}: top other CPU users during its convergence (command, pid, CPU s): "
                  f"{[(c, p, round(t, 1)) for c, p, t in r['top_cpu']]}")
    if k and s and k["mib"] != s["mib"]:
        print(f"  * KSM ran on {k['workers']} x {k['mib']} MiB, shmdedup on {s['workers']} x {s['mib']} MiB")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--scaling", action="store_true",
                    help="rows " + ", ".join(f"{w}x{m}" for w, m in SCALING_ROWS) + " (workers x MiB)")
    ap.add_argument("--scaling-quick", action="store_true",
                    help="rows " + ", ".join(f"{w}x{m}" for w, m in SCALING_QUICK_ROWS))
    ap.add_argument("--defaults", action="store_true",
                    help="no control set on shmdedup (advisor on) vs ksmd at its defaults (100 pages / 20 ms)")
    ap.add_argument("--defaults-ksm-mib", type=int, default=None,
                    help="--defaults: MiB per worker for KSM (default: --mib)")
    ap.add_argument("--steady-seconds", type=float, default=20.0,
                    help="--defaults: least length of the steady-state window")
    ap.add_argument("--settle-seconds", type=float, default=180.0,
                    help="--defaults: most time to wait for shmdedup's advisor to settle (pages_to_scan "
                         "changing < 5%% in a full scan) before the second steady window")


def wanted(cfg: argparse.Namespace) -> bool:
    return bool(cfg.scaling or cfg.scaling_quick or cfg.defaults)


def main(cfg: argparse.Namespace) -> int:
    """Run --scaling / --scaling-quick / --defaults (cfg from vs_ksm's parser)."""
    shm0 = host.dev_shm()
    env = {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    result: dict[str, Any] = {"config": vars(cfg), "environment": env}
    try:
        if cfg.defaults:
            defaults(cfg, result)
        else:
            scaling(cfg, result)
    finally:
        host.KSM.restore()
        left = sorted(host.dev_shm() - shm0)
        result["dev_shm_leftovers"] = left
        if left:
            host.say(f"vs_ksm: WARNING: left in /dev/shm: {left}")
    if cfg.json:
        vk.print_json(result)
    elif cfg.defaults:
        print_defaults(cfg, result)
    else:
        print_scaling(cfg, result)
    return 0
