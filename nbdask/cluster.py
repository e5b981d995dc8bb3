"""Where computation runs: the active ``distributed.Client``, a scheduler address, or a
``LocalCluster`` started (and closed) for one run."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import StoreError

logger = logging.getLogger("nbdask")


def active_client():
    """The current ``distributed.Client``, or None."""
    from distributed import get_client

    try:
        return get_client()
    except ValueError:
        return None


#: glibc malloc settings for the worker processes nbdask starts (set before they spawn, as
#: ``distributed.nanny.pre-spawn-environ``). distributed's default trim threshold of 64 KiB also
#: turns off glibc's adaptive mmap threshold, so every block-sized array (8-16 MiB) is a fresh
#: mmap whose pages fault in one by one and go back to the kernel when freed; keeping blocks on
#: the heap cut the pooling pass over 10^8 comparisons from 25.5 s to 16.6 s on 2 workers (minor
#: page faults 640k -> 80k per worker). At most 256 MiB of freed heap stays with a worker.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20, "MALLOC_TRIM_THRESHOLD_": 256 * 2**20}
_DISTRIBUTED_TRIM = 65536  # distributed's own MALLOC_TRIM_THRESHOLD_
#: dask settings of the worker processes nbdask starts (their nannies hand them the config).
#: distributed's statistical profiler walks every thread's stack each 10 ms for the dashboard,
#: which nbdask's own cluster serves on loopback only: its threads took about 7% of both cores
#: in a 4e8-comparison run. Its system monitor (CPU, memory, network and disk counters from
#: psutil, for the same dashboard) ran every 0.5 s in every process: 2-3 CPU-s per process over
#: a 4e8 run (py-spy); every 2 s, without disk counters, is plenty for a loopback dashboard.
#: Every server (scheduler, nannies, workers) also times its event loop with a callback every
#: 20 ms, to warn when the loop stalls for seconds: every 500 ms still catches those, and took
#: 6 CPU-s less over a 4e8 run (event-loop threads 10.4 -> 8.4 s in the client process, 13.1 and
#: 12.1 -> 10.8 and 10.4 s in the two workers).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False,
                 "distributed.admin.system-monitor.interval": "2s",
                 "distributed.admin.system-monitor.disk": False,
                 "distributed.admin.tick.interval": "500ms"}


def local_cluster(*, workers: int | None = None, threads_per_worker: int = 1,
                  memory_limit: str | None = "auto", **kwargs):
    """A ``LocalCluster`` of worker processes bound to 127.0.0.1, dashboard on loopback only,
    with ``WORKER_MALLOC`` in the workers' environment (a user's own setting, in the environment
    or in ``distributed.nanny.pre-spawn-environ``, wins)."""
    import dask
    from distributed import LocalCluster

    workers = workers or max(1, os.cpu_count() or 1)
    kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    kwargs.setdefault("silence_logs", logging.WARNING)
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    # The nannies write these into this process's environment before spawning, where they
    # outrank the dask config of every later cluster: a value there that is distributed's own
    # default was put there by an earlier cluster, not by the user. Put it all back afterwards.
    before = {name: os.environ.get(name) for name in environ | WORKER_MALLOC}
    for name, value in WORKER_MALLOC.items():
        if environ.get(name) in (None, _DISTRIBUTED_TRIM):  # unset, or distributed's default
            environ[name] = value
        if os.environ.get(name) in (None, str(_DISTRIBUTED_TRIM)):
            os.environ[name] = str(environ[name])
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **WORKER_CONFIG}):
            return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                                processes=True, host="127.0.0.1", memory_limit=memory_limit,
                                **kwargs)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


#: distributed's log records, inside the worker processes of a cluster nbdask starts, that repeat
#: what the client reports anyway: a failed task with its traceback (the error is re-raised on the
#: client, where the CLI prints it as one line), tasks cut short by the cluster's shutdown, and a
#: heartbeat that found the scheduler already closed (nbdask closes it after the run; seen with
#: its traceback at the end of a 4e8 run on busy cores).
_WORKER_NOISE = {
    "distributed.worker": ("Compute Failed", "Failed to communicate with scheduler during heartbeat"),
    "distributed.worker.state_machine": ("Async instruction for",),
}
#: The same in the client process, where the nannies of nbdask's LocalCluster live: a worker
#: still busy when the cluster closes after the run is killed, as intended.
_NANNY_NOISE = {"distributed.nanny": ("Worker process still alive after",)}


class QuietTaskErrors(WorkerPlugin):
    """Worker plugin: silence ``_WORKER_NOISE`` in every worker process (restarted ones too).

    Registered only on the clusters nbdask starts; a user's own cluster keeps its logging.
    """

    name = "nbdask-quiet-task-errors"

    def setup(self, worker=None) -> None:
        _add_filters(_WORKER_NOISE)


def _add_filters(noise: dict[str, tuple[str, ...]]) -> list[tuple[logging.Logger, logging.Filter]]:
    added = []
    for name, prefixes in noise.items():
        log, drop = logging.getLogger(name), _DropMessages(prefixes)
        log.addFilter(drop)
        added.append((log, drop))
    return added


@contextmanager
def _own_cluster(workers: int | None):
    """A LocalCluster and its client, with ``QuietTaskErrors`` on its workers; closed after."""
    from distributed import Client

    added = _add_filters(_NANNY_NOISE)
    try:
        with local_cluster(workers=workers) as cluster, Client(cluster) as conn:
            conn.register_plugin(QuietTaskErrors())
            logger.info("nbdask: started a LocalCluster (%s workers), dashboard %s",
                        len(cluster.workers), cluster.dashboard_link)
            yield conn
    finally:
        for log, drop in added:
            log.removeFilter(drop)


@contextmanager
def compute_client(*, client=None, scheduler: str | None = None, workers: int | None = None):
    """Yield a client: ``client``, else a connection to ``scheduler``, else the active client,
    else a ``LocalCluster`` of ``workers`` processes started for the block and closed after."""
    from distributed import Client

    if client is not None:
        yield client
        return
    if scheduler:
        try:
            conn = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise StoreError(f"scheduler: cannot connect to {scheduler} ({err}); start one with "
                             f"`dask scheduler` or use --workers N for a local cluster") from None
        with conn:
            yield conn
        return
    current = active_client() if workers is None else None
    if current is not None:
        yield current
        return
    with _own_cluster(workers) as conn:
        yield conn


def show_progress(futures) -> None:
    """A console progress bar over the tasks behind ``futures`` (blocks until they finish)."""
    from distributed import progress

    progress(futures, notebook=False)
