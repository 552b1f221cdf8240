"""Kill -9 at any instant (DESIGN invariant 7), in randomized trials.

Worker kills: a long-lived coordinator process and two long-lived surviving
workers; each trial forks a victim worker whose pages duplicate the
survivors', and kills it at one instant: at a C fault point of a merge
(write-protected; slot mapped; punched, unpublished) or of a break (content
copied back; backing mapped, unpublished), in the agent between merging a
batch and replying, or from outside at a random moment.  The victim's state
bytes, read through a descriptor the test kept, prove where it died.

Coordinator kills: three long-lived workers; each trial starts a coordinator
process on the same socket (a restart: the agents reconnect), lets it merge
while the workers change their regions, and kills it at a random moment.
While none runs, the workers write to merged pages (copy-on-write needs no
coordinator).

After every trial: every surviving process reads exactly its expected bytes;
at quiescence the coordinator's counters equal a recount from the workers'
state bytes, no stable slot is allocated that nobody maps, and merging has
converged (worker kills: exactly the duplicate pages are merged; coordinator
kills: no two private pages are alike).  /dev/shm holds nothing of ours at
the end (fixture no_shm_leftovers).

Every trial draws from ``random.Random`` seeded with SEED (set
SHMDEDUP_STRESS_SEED to replay; a failure names the seed and the trial;
SHMDEDUP_STRESS_TRIALS sets the trials per part, 4 parts in all).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from typing import Any

import pytest

from shmdedup import _native, _shm
from tests.cluster import (
    WORKER_SETUP,
    CoordinatorProcess,
    Zygote,
    digest,
    merged_counts,
    recount_problem,
    settle,
    start_worker,
    wait_registered,
)
from tests.helpers import Worker, no_shm_leftovers, reaper, wait_for  # noqa: F401

P = _native.PAGE_SIZE
SEED = int(os.environ.get("SHMDEDUP_STRESS_SEED", "1700"))
# Trials per part of each test; two parts each, run in parallel under xdist.
TRIALS = int(os.environ.get("SHMDEDUP_STRESS_TRIALS", "50"))
WORKER_TRIALS = COORDINATOR_TRIALS = TRIALS
CONTROLS = {"sleep_millisecs": 0, "pages_to_scan": 64, "use_zero_pages": 1}
ZERO = bytes(P)

pytestmark = [pytest.mark.stress, pytest.mark.usefixtures("no_shm_leftovers")]

MERGE_POINTS = ("merge_protected", "merge_mapped", "merge_punched")
BREAK_POINTS = ("break_copied", "break_mapped")
WORKER_KILLS = MERGE_POINTS + BREAK_POINTS + ("agent_merged", "external")


class Pages:
    """Page contents: a small pool (so pages repeat within and across
    workers), the zero page, and unique pages."""

    def __init__(self, rng: random.Random, pool: int = 24) -> None:
        self.rng = rng
        self.pool = [rng.randbytes(P) for _ in range(pool)]

    def page(self) -> bytes:
        x = self.rng.random()
        if x < 0.1:
            return ZERO
        if x < 0.25:
            return self.rng.randbytes(P)
        return self.rng.choice(self.pool)

    def region(self, npages: int, own: int = 0) -> bytearray:
        """npages pages; with own > 0, a third of them repeat own fresh contents
        that no other region holds (stable slots only this region shares)."""
        local = [self.rng.randbytes(P) for _ in range(own)]
        return bytearray(b"".join(self.rng.choice(local) if local and self.rng.random() < 0.33
                                  else self.page() for _ in range(npages)))


def pages_of(data: bytes | bytearray) -> list[bytes]:
    return [bytes(data[i:i + P]) for i in range(0, len(data), P)]


def expected_states(regions: list[bytearray]) -> list[bytes]:
    """Converged state bytes: zero pages ZERO, duplicated pages MERGED, the rest PRIVATE."""
    count = Counter(p for data in regions for p in pages_of(data))
    out = []
    for data in regions:
        out.append(bytes(_native.ZERO if p == ZERO else _native.MERGED if count[p] > 1 else _native.PRIVATE
                         for p in pages_of(data)))
    return out


def run_trials(kind: str, part: int, n: int, trial: Any) -> None:
    for i in range(n):
        rng = random.Random(f"{SEED}-{kind}-{part}-{i}")
        try:
            trial(i, rng)
        except BaseException as e:
            raise AssertionError(f"{kind} trial {i} of part {part} failed (SHMDEDUP_STRESS_SEED={SEED}): "
                                 f"{type(e).__name__}: {e}") from e


# ---- worker kills --------------------------------------------------------------

class WorkerKills:
    def __init__(self, rng: random.Random) -> None:
        self.tmp = tempfile.mkdtemp(prefix="shmdedup-kill-")
        self.path = os.path.join(self.tmp, "c.sock")
        self.pages = Pages(rng)
        self.tally: Counter[tuple[str, bool]] = Counter()
        self.coord = CoordinatorProcess(self.path, **CONTROLS)
        self.survivors: list[Worker] = []
        self.zygote: Zygote | None = None
        try:
            self.coord.go()
            self.client = self.coord.client()
            self.zygote = Zygote()
            self.survivors = [start_worker(self.path) for _ in range(2)]
            self.data = [self.pages.region(128) for _ in self.survivors]
            for w, data in zip(self.survivors, self.data):
                w.call("new('s', data)", data=bytes(data))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for w in self.survivors:
            w.close()
        if self.zygote is not None:
            self.zygote.close()
        self.coord.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def mutate_survivors(self, rng: random.Random) -> None:
        """Writes to random pages: copy-on-write breaks of pages the victim shares."""
        for k, (w, data) in enumerate(zip(self.survivors, self.data)):
            if rng.random() < 0.15:  # a new region in its place (merges in flight for the old one)
                self.data[k] = data = self.pages.region(len(data) // P)
                w.call("close('s'); new('s', data)", data=bytes(data))
                continue
            edits = []
            for _ in range(rng.randint(0, 3)):
                page = rng.randrange(len(data) // P)
                content = self.pages.page()
                data[page * P:(page + 1) * P] = content
                edits.append((page * P, content))
            w.call("write('s', edits)", edits=edits)

    def trial(self, i: int, rng: random.Random) -> None:
        self.pages.rng = rng
        kill = WORKER_KILLS[i % len(WORKER_KILLS)]
        self.mutate_survivors(rng)
        victim = self.zygote.fork(WORKER_SETUP, SOCKET=self.path)
        vdata = self.pages.region(rng.randint(32, 160), own=rng.randint(0, 6))
        fds: list[int] = []
        try:
            hit = self.kill_victim(victim, vdata, kill, rng, fds)
            assert victim.wait() == -signal.SIGKILL, f"victim exited with {victim.exitcode}, not by SIGKILL"
            if hit:
                self.check_death_point(kill, fds)
        finally:
            victim.kill()
            for fd in fds:
                os.close(fd)
        self.tally[(kill, hit)] += 1
        self.check_survivors()

    def kill_victim(self, victim: Any, vdata: bytearray, kill: str, rng: random.Random,
                    fds: list[int]) -> bool:
        """Kill the victim as the trial says; True if it died at its fault point."""
        if kill in MERGE_POINTS or kill == "agent_merged":
            countdown = rng.randint(0, 1 if kill == "agent_merged" else 5)
            victim.call(f"_native._test_arm_fault({kill!r}, {countdown})")
        try:
            _, got = victim.run("new('v', data, send=True)", data=bytes(vdata))
        except AssertionError as e:
            # Armed at a merge point, it may die before its fds reach us (the
            # agent merges while they are sent): a kill, just not checkable
            # page by page.
            assert "died" in str(e), e
            return False
        fds += got
        if kill == "external":
            time.sleep(rng.uniform(0, 0.15))  # the random moment (not a synchronisation)
            victim.kill()
            return False
        want = expected_states(self.data + [vdata])[-1]
        if kill in BREAK_POINTS:
            wait_for(lambda: self.victim_states(victim) == want, 30, "the victim's pages to merge")
            merged = [p for p, s in enumerate(want) if s != _native.PRIVATE]
            if not merged:
                victim.kill()
                return False
            victim.call(f"_native._test_arm_fault({kill!r}, {rng.randint(0, min(4, len(merged) - 1))})")
            how = rng.choice(["write", "break_range", "unmergeable"])
            try:
                if how == "write":
                    victim.call("write('v', edits)", edits=[(p * P + 7, b"\x55") for p in merged])
                elif how == "break_range":
                    victim.call("regions['v'].break_range(0, regions['v'].npages)")
                else:
                    victim.call("regions['v'].advise(UNMERGEABLE)")
            except AssertionError as e:
                assert "died" in str(e), e
                return True
            victim.kill()  # fewer breaks than the countdown (merged runs): a miss
            return False
        # A merge point or the agent's: it dies merging, or merges everything
        # first (the countdown outran the passes: a miss, killed from outside).
        def outcome() -> str | None:
            states = self.victim_states(victim)
            return "dead" if states is None else "merged" if states == want else None
        if wait_for(outcome, 30, "the victim to die merging or to merge everything") == "merged":
            victim.kill()
            return False
        return True

    def victim_states(self, victim: Any) -> bytes | None:
        """The victim's state bytes, or None once it has died."""
        try:
            return victim.call("result = regions['v'].states()", timeout=10)
        except AssertionError as e:
            if "died" in str(e):
                return None
            raise

    def check_death_point(self, kill: str, fds: list[int]) -> None:
        backing, meta = fds
        n = os.fstat(backing).st_size // P
        states = os.pread(meta, n, 0)
        merging = [p for p in range(n) if states[p] == _native.MERGING]
        breaking = [p for p in range(n) if states[p] == _native.BREAKING]
        if kill in MERGE_POINTS:
            assert merging and not breaking, f"{kill}: states {states!r}"
            data = set()
            for start, length in _shm.data_extents(backing, 0, n * P):
                data.update(range(start // P, -(-(start + length) // P)))
            punched = [p for p in merging if p not in data]
            if kill == "merge_punched":
                assert punched == merging, f"merge_punched: MERGING pages {merging}, holes {punched}"
            else:
                assert punched == [], f"{kill}: MERGING pages {punched} already punched"
        elif kill in BREAK_POINTS:
            assert breaking and not merging, f"{kill}: states {states!r}"
        else:  # agent_merged: the batch completed, only the reply was lost
            assert not merging and not breaking, f"agent_merged: states {states!r}"

    def check_survivors(self) -> None:
        want_states = expected_states(self.data)
        pids = sorted(w.pid for w in self.survivors)
        count = Counter(p for data in self.data for p in pages_of(data))
        shared = sum(1 for p, c in count.items() if c > 1 and p != ZERO)

        def problem() -> str | None:
            stats = self.client.stats()
            got_pids = sorted(w["pid"] for w in stats["workers"])
            if got_pids != pids:
                return f"workers {got_pids}, survivors {pids}"
            states = [w.call("result = states()")["s"] for w in self.survivors]
            merged, zero = merged_counts({str(i): s for i, s in enumerate(states)})
            bad = recount_problem(stats, merged, zero)
            if bad:
                return bad
            if states != want_states:
                diff = [(k, p, s[p], want[p]) for k, (s, want) in enumerate(zip(states, want_states))
                        for p in range(len(s)) if s[p] != want[p]]
                return f"survivor pages not converged (worker, page, state, expected): {diff[:10]}"
            if stats["pages_shared"] != shared or stats["pages_inherited"]:
                return f"pages_shared {stats['pages_shared']} (expected {shared}), inherited {stats['pages_inherited']}"
            return None

        settle(self.client, problem, 30, "the coordinator to settle after the victim's death")
        for w, data in zip(self.survivors, self.data):
            assert w.call("result = digests()")["s"] == digest(data), f"survivor {w.pid} lost bytes"


@pytest.mark.parametrize("part", [0, 1])
def test_worker_killed_at_any_instant(part: int) -> None:
    kills = WorkerKills(random.Random(f"{SEED}-worker-setup-{part}"))
    try:
        run_trials("worker", part, WORKER_TRIALS, kills.trial)
    finally:
        kills.close()
    print(f"worker kills (point, died there): {sorted(kills.tally.items())}")
    hit = {kill for (kill, at_point), _ in kills.tally.items() if at_point}
    assert set(WORKER_KILLS) - {"external"} <= hit, f"fault points never reached: {kills.tally}"


# ---- coordinator kills -----------------------------------------------------------

class CoordinatorKills:
    def __init__(self, rng: random.Random) -> None:
        self.tmp = tempfile.mkdtemp(prefix="shmdedup-kill-")
        self.path = os.path.join(self.tmp, "c.sock")
        self.pages = Pages(rng)
        self.names = itertools.count()
        self.kills = 0
        self.coord: CoordinatorProcess | None = None
        self.launcher = CoordinatorProcess(self.path, **CONTROLS)
        self.workers: list[Worker] = []
        try:
            self.workers = [start_worker(self.path) for _ in range(3)]
            self.data: list[dict[str, bytearray]] = [{} for _ in self.workers]
            for k in range(len(self.workers)):
                for _ in range(2):
                    self.new_region(k, rng)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.coord is not None:
                self.coord.stop()
            self.launcher.stop()
        finally:
            for w in self.workers:
                w.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def new_region(self, k: int, rng: random.Random) -> None:
        name = f"r{next(self.names)}"
        data = self.pages.region(rng.randint(16, 64))
        self.workers[k].call("new(name, data)", name=name, data=bytes(data))
        self.data[k][name] = data

    def write_pages(self, k: int, rng: random.Random, n: int) -> None:
        """n writes: whole pages of new content, or a few bytes in a page."""
        regions = self.data[k]
        edits: dict[str, list] = {}
        for _ in range(n):
            name = rng.choice(sorted(regions))
            data = regions[name]
            page = rng.randrange(len(data) // P)
            if rng.random() < 0.5:
                off, content = page * P, self.pages.page()
            else:
                off, content = page * P + rng.randrange(P - 64), rng.randbytes(rng.randint(1, 64))
            data[off:off + len(content)] = content
            edits.setdefault(name, []).append((off, content))
        self.workers[k].call("for name, e in edits.items(): write(name, e)", edits=edits)

    def mutate(self, rng: random.Random) -> None:
        for k, w in enumerate(self.workers):
            regions = self.data[k]
            action = rng.choice(["write", "write", "new", "close", "unmergeable", "none"])
            if action == "new" and len(regions) < 4 or action == "close" and len(regions) < 2:
                self.new_region(k, rng)
            elif action == "close":
                name = rng.choice(sorted(regions))
                w.call("close(name)", name=name)
                del regions[name]
            elif action == "write":
                self.write_pages(k, rng, rng.randint(1, 6))
            elif action == "unmergeable":  # break it all, then advise again
                w.call("r = regions[name]; r.advise(UNMERGEABLE); r.advise(MERGEABLE)",
                       name=rng.choice(sorted(regions)))

    def check_bytes(self, when: str) -> None:
        for w, regions in zip(self.workers, self.data):
            want = {name: digest(data) for name, data in regions.items()}
            assert w.call("result = digests()") == want, f"worker {w.pid} lost bytes {when}"

    def restart(self) -> CoordinatorProcess:
        self.coord = self.launcher.go()
        self.launcher = CoordinatorProcess(self.path, **CONTROLS)  # ready for the next restart
        return self.coord

    def check_settled(self) -> None:
        """The agents are back, the counters equal a recount, merging converged."""
        assert self.coord is not None
        client = self.coord.client()
        wait_registered(client, {w.pid: len(d) for w, d in zip(self.workers, self.data)})

        def problem() -> str | None:
            stats = client.stats()
            states = [w.call("result = states()") for w in self.workers]
            merged = zero = 0
            private: Counter[bytes] = Counter()
            for regions, st in zip(self.data, states):
                m, z = merged_counts(st)
                merged, zero = merged + m, zero + z
                for name, s in st.items():
                    for p, content in enumerate(pages_of(regions[name])):
                        if s[p] == _native.PRIVATE:
                            private[content] += 1
            bad = recount_problem(stats, merged, zero)
            if bad:
                return bad
            alike = sum(1 for content, c in private.items() if c > 1 or content == ZERO)
            if alike:
                return f"{alike} contents still private in more than one page (or zero)"
            return None

        settle(client, problem, 30, "the restarted coordinator to settle")

    def trial(self, i: int, rng: random.Random) -> None:
        self.pages.rng = rng
        coord = self.restart()
        self.check_settled()
        self.mutate(rng)
        time.sleep(rng.uniform(0, 0.3))  # the random moment of the kill (not a synchronisation)
        coord.kill()
        self.coord = None
        self.kills += 1
        self.check_bytes("after the coordinator was killed")
        # Copy-on-write needs no coordinator.
        for k in range(len(self.workers)):
            self.write_pages(k, rng, rng.randint(1, 4))
        self.check_bytes("writing with no coordinator")


@pytest.mark.parametrize("part", [0, 1])
def test_coordinator_killed_at_any_instant(part: int) -> None:
    kills = CoordinatorKills(random.Random(f"{SEED}-coordinator-setup-{part}"))
    try:
        run_trials("coordinator", part, COORDINATOR_TRIALS, kills.trial)
        # A last restart settles too; then an orderly stop keeps every byte.
        kills.restart()
        kills.check_settled()
        assert kills.coord is not None
        assert kills.coord.stop() == 0
        kills.coord = None
        kills.check_bytes("after an orderly stop")
    finally:
        kills.close()
    print(f"coordinator kills: {kills.kills}")
    assert kills.kills == COORDINATOR_TRIALS
