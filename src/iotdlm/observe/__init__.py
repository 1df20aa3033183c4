"""Health, readiness and Prometheus metrics of every module (issue 14; docs/adr/0018).

- :mod:`iotdlm.observe.metrics` -- the counters and histograms one module process keeps
  (:class:`ModuleMetrics`, its own registry: no global state) and the merge of several processes'
  text expositions into one (:func:`merge_expositions`);
- :mod:`iotdlm.observe.serve` -- answers ``iotdlm.v1.<module>.health`` and ``.metrics`` on the bus
  (:class:`Observer`);
- :mod:`iotdlm.observe.gather` -- asks every running module for its metrics and serves them as one
  ``/metrics`` on a loopback port (the supervisor runs it).

Nothing here is labelled by device, serial or subject name from the outside: label values come
from short fixed sets (profiles, error codes, routes), so a scrape stays small.
"""

from iotdlm.observe.metrics import ModuleMetrics, merge_expositions
from iotdlm.observe.serve import Observer

__all__ = ["ModuleMetrics", "Observer", "merge_expositions"]
