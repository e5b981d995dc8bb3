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


def local_cluster(*, workers: int | None = None, threads_per_worker: int = 1,
                  memory_limit: str | None = "auto", **kwargs):
    """A ``LocalCluster`` of worker processes bound to 127.0.0.1, dashboard on loopback only."""
    from distributed import LocalCluster

    workers = workers or max(1, os.cpu_count() or 1)
    kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    kwargs.setdefault("silence_logs", logging.WARNING)
    return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                        host="127.0.0.1", memory_limit=memory_limit, **kwargs)


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
