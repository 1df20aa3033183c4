"""The metrics one module process keeps, and the merge of several processes' expositions.

Each process has its own :class:`prometheus_client.CollectorRegistry` (injected, never the global
one), so tests and several services in one interpreter do not share counters. Every sample
carries ``module`` and ``instance`` (``<module>-<pid>``) labels, added when the text is rendered,
so the supervisor's ``/metrics`` tells the workers apart without a port per worker.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
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
        return generate_latest(_Labelled(self.registry, {"module": self.module, "instance": self.instance}))


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
#: one sample line of the text format: name, optional {labels}, value, optional timestamp
_SAMPLE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})?'
    r" ([^ ]+)( -?[0-9]+)?\Z"
)
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped", "info", "stateset", "gaugehistogram"})


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    lines: list[str] = field(default_factory=list)


def _refuse(part: int, line: int, what: str) -> BadRequestError:
    return BadRequestError(f"metrics part {part}, line {line}: {what}", field="metrics")


def _read_part(families: dict[str, _Family], text: str, part: int) -> None:
    current: str | None = None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            words = line.split(None, 3)
            if len(words) < 3 or words[1] not in ("HELP", "TYPE"):
                continue  # a comment
            name = words[2]
            if not _NAME.match(name):
                raise _refuse(part, n, f"{name[:60]!r} is not a metric name")
            fam = families.setdefault(name, _Family())
            rest = words[3] if len(words) > 3 else ""
            if words[1] == "TYPE":
                if rest.strip() not in _TYPES:
                    raise _refuse(part, n, f"unknown metric type {rest.strip()[:30]!r}")
                if fam.type is not None and fam.type != rest.strip():
                    raise _refuse(part, n, f"metric {name} is a {fam.type} in one part and a {rest.strip()} in another")
                fam.type = rest.strip()
            elif fam.help is None:
                fam.help = rest
            current = name
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise _refuse(part, n, "not a sample line (name{labels} value)")
        try:
            float(m.group(3))
        except ValueError:
            raise _refuse(part, n, f"{m.group(3)[:30]!r} is not a number") from None
        if current is None or not m.group(1).startswith(current):
            current = m.group(1)
        families.setdefault(current, _Family()).lines.append(line)


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """One exposition from several processes': the samples of each metric family together,
    under one HELP and TYPE line (Prometheus refuses a family declared twice). Line by line, with
    every line checked against the text format (parsing each sample fully costs ~10x more).

    Raises :class:`BadRequestError` naming the part and line that is not the text format, or
    the metric whose parts disagree on its type.
    """
    families: dict[str, _Family] = {}
    for i, raw in enumerate(texts, 1):
        if len(raw) > MAX_EXPOSITION:
            raise BadRequestError(f"metrics part {i} is over {MAX_EXPOSITION} bytes", field="metrics")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError(f"metrics part {i} is not UTF-8 text", field="metrics") from None
        _read_part(families, text, i)
    out: list[str] = []
    for name, fam in families.items():
        if fam.help is not None:
            out.append(f"# HELP {name} {fam.help}")
        if fam.type is not None:
            out.append(f"# TYPE {name} {fam.type}")
        out.extend(fam.lines)
    return ("\n".join(out) + "\n").encode() if out else b""
