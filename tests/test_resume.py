"""`nbdask test --resume` in a retry loop converges, whatever stage the client was killed in.

The client is the real `nbdask` console script, killed with SIGKILL by a scheduler plugin at
the first task to finish in the named stage: the pooling pass (before the results store exists)
or the FDR pass (every block written, q-values under way).
"""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import key_split

import nbdask
from test_cluster import nbdask_script

N_BLOCKS = 16


def reads_counts(prefix: str) -> bool:
    """Whether tasks of this key prefix read the cube's counts: xarray's reads, or, when the
    run holds them in memory (``nbdask.cache``), the reads fused with their compaction."""
    return prefix in ("open_dataset-counts", "compact")


class KillClientAt(SchedulerPlugin):
    """SIGKILL process ``pid`` when the first task of ``stage`` finishes on the scheduler.

    "pooling": a read of ``counts`` (before the results store exists only the pooling pass reads
    them); "fdr": any task once the store has its ``q_value`` array (the FDR pass writes its
    skeleton before computing).
    """

    name = "kill-client-at"

    def __init__(self, pid: int, stage: str, out: str):
        self.pid, self.stage, self.out, self.fired = pid, stage, out, False

    def transition(self, key, start, finish, *args, **kwargs):
        if self.fired or finish != "memory":
            return
        if self.stage == "pooling":
            hit = reads_counts(key_split(key)) and not os.path.exists(self.out)
        else:
            hit = os.path.exists(os.path.join(self.out, "q_value", "zarr.json"))
        if hit:
            self.fired = True
            os.kill(self.pid, signal.SIGKILL)


class CountTasks(SchedulerPlugin):
    """Tasks finished on the scheduler, by key prefix."""

    name = "count-tasks"

    def __init__(self):
        self.counts = {}

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory":
            self.counts[key_split(key)] = self.counts.get(key_split(key), 0) + 1


def finished_tasks(client) -> dict:
    return client.run_on_scheduler(lambda dask_scheduler: dict(dask_scheduler.plugins[CountTasks.name].counts))


@pytest.fixture(scope="module")
def cube_and_reference(tmp_path_factory, client):
    """A cube of 4 x 4 blocks and its results from one uninterrupted run (the defaults)."""
    root = tmp_path_factory.mktemp("resume")
    cube, ref = str(root / "cube.zarr"), str(root / "ref.zarr")
    nbdask.save_cube(nbdask.simulate(perturbations=80, features=80, seed=6, chunks=20), cube)
    nbdask.save_results(nbdask.test(nbdask.open_cube(cube)), ref, client=client)
    return cube, nbdask.open_results(ref).load()


def until_it_succeeds(client, args, out, *, kill_at=None):
    """`until nbdask test ... --resume; do :; done`, the first attempt killed at ``kill_at``."""
    attempts = []
    while len(attempts) < 4:
        job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kill_at and not attempts:
            client.register_plugin(KillClientAt(job.pid, kill_at, out))
        stdout, stderr = job.communicate(timeout=300)
        if kill_at and not attempts:
            client.unregister_scheduler_plugin(KillClientAt.name)
        attempts.append((job.returncode, stderr, os.path.exists(out)))
        if job.returncode == 0:
            return attempts
    raise AssertionError(f"no convergence in {len(attempts)} attempts: {attempts}")


def assert_equal_results(out, reference):
    res = nbdask.open_results(out)
    assert set(res.data_vars) == set(reference.data_vars)
    for name in reference.data_vars:
        np.testing.assert_array_equal(res[name].values, reference[name].values, err_msg=name)
    for key in ("n_tests", "n_significant_q05", "n_significant_q10", "options"):
        assert res.attrs[key] == reference.attrs[key], key


def test_resume_after_a_kill_in_the_pooling_pass_and_again_when_complete(cube_and_reference, client, tmp_path):
    cube, reference = cube_and_reference
    out = str(tmp_path / "r.zarr")
    args = [nbdask_script(), "test", cube, out, "--scheduler", client.scheduler.address,
            "--no-progress", "--resume"]
    attempts = until_it_succeeds(client, args, out, kill_at="pooling")
    # Killed in the pooling pass, before the store existed (and before a word was said); the
    # retry says what it does in one line and runs afresh.
    assert attempts == [(-signal.SIGKILL, "", False),
                        (0, f"nbdask: {out}: no results store yet; starting a fresh run\n", True)]
    assert_equal_results(out, reference)
    assert nbdask.open_results(out).attrs["computed_blocks"] == N_BLOCKS

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stderr == f"nbdask: {out}: already complete; nothing to resume\n"
    lines = [line.split() for line in again.stdout.splitlines()]
    assert ["comparisons", "6,400"] in lines and not any("wall" in line for line in lines)
    assert_equal_results(out, reference)


def test_resume_after_a_kill_in_the_fdr_pass_skips_finished_stages(cube_and_reference, client, tmp_path):
    cube, reference = cube_and_reference
    out = str(tmp_path / "r.zarr")
    args = [nbdask_script(), "test", cube, out, "--scheduler", client.scheduler.address,
            "--no-progress", "--resume"]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client.register_plugin(KillClientAt(job.pid, "fdr", out))
    try:
        assert job.wait(timeout=300) == -signal.SIGKILL
    finally:
        client.unregister_scheduler_plugin(KillClientAt.name)
    group = zarr.open_group(out, mode="r")
    assert group.attrs["nbdask_status"] == "incomplete" and "q_value" in group
    assert group["nbdask_done_blocks"][:].all()
    with pytest.raises(nbdask.ResultsError, match="not complete"):
        nbdask.open_results(out)

    client.register_plugin(CountTasks())
    try:
        attempts = until_it_succeeds(client, args, out)
        finished = finished_tasks(client)
    finally:
        client.unregister_scheduler_plugin(CountTasks.name)
    assert attempts == [(0, f"nbdask: {out}: resuming (status incomplete): 0 of {N_BLOCKS} "
                            f"blocks to compute, then the FDR pass\n", True)]
    # Neither the pooling pass nor any block reads the counts again: only the FDR pass runs.
    assert not any(reads_counts(k) or "sums" in k for k in finished), finished
    assert_equal_results(out, reference)
    assert nbdask.open_results(out).attrs["resumed_blocks"] == 0


def test_resume_of_a_store_whose_run_died_before_its_first_block(cube_and_reference, client, tmp_path):
    """A store with its status attribute but no block record (killed while writing its
    skeleton) is started afresh by resume, in the library as in the CLI."""
    cube, reference = cube_and_reference
    out = str(tmp_path / "r.zarr")
    zarr.open_group(out, mode="w").attrs["nbdask_status"] = "incomplete"
    saved = nbdask.save_results(nbdask.test(nbdask.open_cube(cube)), out, resume=True, client=client)
    assert saved.attrs["computed_blocks"] == N_BLOCKS
    assert_equal_results(out, reference)
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w")
    with pytest.raises(nbdask.ResultsError, match="not an nbdask results store"):
        nbdask.save_results(nbdask.test(nbdask.open_cube(cube)), str(foreign), resume=True, client=client)
    assert Path(foreign).exists()
