"""Execution backends: where nodes run besides cancelflow's own pools.

* ``_base``: :class:`PoolBackend`, the pool protocol that ``ThreadPool``, ``ProcessPool``
  and ``DaskRunner`` implement and the executor depends on.
* ``_dask``: :class:`~cancelflow.DaskRunner`, nodes on a Dask ``distributed`` cluster
  (``pip install cancelflow[dask]``). Its worker side is ``_dask_worker`` (imported only
  where ``distributed`` is installed) and its child side ``_dask_child``.

Importing this package, or ``_dask``, does not import ``distributed``: that happens when a
runner first connects.
"""

from __future__ import annotations
