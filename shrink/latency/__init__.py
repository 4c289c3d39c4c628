"""Prune to a latency budget: a per-layer latency model of a runtime, an allocation over the
channel groups, and end-to-end measurements that correct it (``docs/latency.md``).

* :mod:`~shrink.latency.options`: :class:`LatencyTarget`, :class:`Runtime` and
  :class:`LossValuation` (plain data);
* :mod:`~shrink.latency.layers`: the model's prunable layer calls, tied to the groups;
* :mod:`~shrink.latency.table`: one layer's time against its kept channels (block steps);
* :mod:`~shrink.latency.measure`: timing one layer or whole models on a runtime;
* :mod:`~shrink.latency.cache`: the tables on disk (JSON);
* :mod:`~shrink.latency.value`: what keeping ``k`` channels of a group is worth (scores or
  measured loss);
* :mod:`~shrink.latency.solve`: the Lagrangian allocation;
* :mod:`~shrink.latency.correct`: from end-to-end measurements to the next plan;
* :mod:`~shrink.latency.target`: :func:`solve_latency`, the loop that ties them together.
"""

from shrink.latency.options import LatencyTarget, LossValuation, Runtime
from shrink.latency.target import LatencySolution, solve_latency

__all__ = ["LatencySolution", "LatencyTarget", "LossValuation", "Runtime", "solve_latency"]
