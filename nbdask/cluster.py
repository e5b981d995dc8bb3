"""Where computation runs: the active ``distributed.Client``, a scheduler address, or a
``LocalCluster`` started (and closed) for one run."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

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
    with local_cluster(workers=workers) as cluster, Client(cluster) as conn:
        logger.info("nbdask: started a LocalCluster (%s workers), dashboard %s",
                    len(cluster.workers), cluster.dashboard_link)
        yield conn


def show_progress(futures) -> None:
    """A console progress bar over the tasks behind ``futures`` (blocks until they finish)."""
    from distributed import progress

    progress(futures, notebook=False)
