"""The metrics one module process keeps, and the merge of several processes' expositions.

Each process has its own :class:`prometheus_client.CollectorRegistry` (injected, never the global
one), so tests and several services in one interpreter do not share counters. Every sample
carries ``module`` and ``instance`` (``<module>-<pid>``) labels, added when the text is rendered,
so the supervisor's ``/metrics`` tells the workers apart without a port per worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from iotdlm.errors import BadRequestError
from iotdlm.wire import km as msg

#: the content type of the text exposition (format 0.0.4), what Prometheus scrapes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: seconds: fast bus and HTTP answers up to a slow CA signature on a loaded machine
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: longest exposition one process may send (a module's is a few kB; more is hostile or a bug)
MAX_EXPOSITION = 1024 * 1024
#: label values outside a known set are folded into this one (no label explosion from input)
OTHER = "other"


def instance_name(module: str, pid: int | None = None) -> str:
    """``<module>-<pid>``: the ``instance`` label of one process."""
    return f"{module}-{os.getpid() if pid is None else pid}"


class _Labelled(Collector):
    """Yields ``source``'s metrics with ``module`` and ``instance`` labels added to every sample."""

    def __init__(self, source: CollectorRegistry, labels: dict[str, str]) -> None:
        self._source = source
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            # the *_created series (when each label set first appeared) only double a scrape's size
            out.samples = [
                s._replace(labels={**s.labels, **self._labels})
                for s in family.samples
                if not s.name.endswith("_created")
            ]
            yield out


class ModuleMetrics:
    """The counters of one module process. Cheap on the hot path: a counter or histogram update
    per request, label values from fixed sets only (never a device, a serial or a raw subject)."""

    def __init__(self, module: str, *, pid: int | None = None, registry: CollectorRegistry | None = None) -> None:
        self.module = module
        self.instance = instance_name(module, pid)
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.issued = Counter(
            "iotdlm_certificates_issued", "Certificates km issued, by profile.", ["profile"], registry=r
        )
        self.issue_seconds = Histogram(
            "iotdlm_issue_seconds",
            "Time km took to answer an issuing request (issue, batch, renew, EST), by profile.",
            ["profile"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refusals = Counter("iotdlm_refusals", "Requests refused, by error code.", ["code"], registry=r)
        self.ocsp = Counter(
            "iotdlm_ocsp_responses", "OCSP answers km gave, cached or signed now.", ["source"], registry=r
        )
        self.crls = Counter("iotdlm_crl_generations", "Full CRLs km generated on its schedule.", registry=r)
        self.http = Counter(
            "iotdlm_http_requests", "HTTP requests cm answered, by route and status.", ["route", "status"], registry=r
        )
        self.requests = Histogram(
            "iotdlm_request_seconds",
            "Time from a bus request's arrival to its answer, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "iotdlm_requests_in_flight", "Bus requests being answered now (queue depth).", registry=r
        )
        self.mode = Gauge(
            "iotdlm_mode", "1 for the operation mode this process reads, 0 for the others.", ["mode"], registry=r
        )
        self.ready = Gauge("iotdlm_ready", "1 when this process is ready to work, else 0.", registry=r)
        self.started = Gauge("iotdlm_process_start_time_seconds", "When this process started (Unix time).", registry=r)
        self.started.set(time.time())
        self._known_modes: set[str] = set()

    # --- what the services call -------------------------------------------------------------
    def issued_one(self, profile: str, seconds: float) -> None:
        self.issued.labels(profile).inc()
        self.issue_seconds.labels(profile).observe(seconds)

    def issued_from(self, result: object, seconds: float) -> None:
        """Count what km's answer ``result`` issued (a certificate, an EST answer, a batch), by
        profile; anything else counts nothing."""
        if isinstance(result, msg.EstResponse):
            result = result.certificate
        if isinstance(result, msg.IssuedCertificate):
            self.issued_one(result.profile, seconds)
        elif isinstance(result, msg.BatchIssueResponse):
            for item in result.results:
                if item.certificate is not None:
                    self.issued_one(item.certificate.profile, seconds)

    def refused(self, code: str) -> None:
        self.refusals.labels(code).inc()

    def set_mode(self, mode: str | None) -> None:
        name = mode or "none"
        self._known_modes.add(name)
        for known in self._known_modes:
            self.mode.labels(known).set(1 if known == name else 0)

    def exposition(self) -> bytes:
        """The text exposition of this process, every sample labelled with module and instance."""
        labelled = CollectorRegistry(auto_describe=False)
        labelled.register(_Labelled(self.registry, {"module": self.module, "instance": self.instance}))
        return generate_latest(labelled)


class _Merged(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """One exposition from several processes': the samples of each metric family together,
    under one HELP and TYPE line (Prometheus refuses a family declared twice).

    Raises :class:`BadRequestError` naming the part that is not a text exposition, or whose
    families disagree on a type.
    """
    families: dict[str, Metric] = {}
    for i, raw in enumerate(texts):
        if len(raw) > MAX_EXPOSITION:
            raise BadRequestError(f"metrics part {i + 1} is over {MAX_EXPOSITION} bytes", field="metrics")
        try:
            parsed = list(text_string_to_metric_families(raw.decode("utf-8")))
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            raise BadRequestError(
                f"metrics part {i + 1} is not a Prometheus text exposition: {exc}", field="metrics"
            ) from None
        for family in parsed:
            have = families.get(family.name)
            if have is None:
                families[family.name] = family
            elif have.type != family.type:
                raise BadRequestError(
                    f"metric {family.name} is a {have.type} in one part and a {family.type} in another", field="metrics"
                )
            else:
                have.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(families.values()))
    return generate_latest(registry)
