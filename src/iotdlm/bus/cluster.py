"""A NATS cluster as the bus sees it (ADR 0027): the server list of ``[nats] url`` and how many
replicas what the deployment keeps in JetStream gets. Pure: no I/O."""

from __future__ import annotations

from iotdlm.bus import urls
from iotdlm.errors import BadRequestError

#: JetStream keeps at most 5 replicas of a stream
MAX_REPLICAS = 5
#: from this many nodes on, the mode bucket and the audit heads stream get 3 replicas
CLUSTER_QUORUM = 3


def server_urls(url: str) -> list[str]:
    """The servers of ``[nats] url``: one URL, or several separated by commas (the nodes of a
    cluster, tried in turn; the client learns the others from the first it reaches)."""
    parts = [p.strip() for p in url.split(",")]
    if not all(parts):
        raise BadRequestError(f"the NATS URL list {url!r} has an empty entry", field="nats.url")
    for part in parts:
        urls.nats_host(part)
    return parts


def check_replicas(replicas: int) -> None:
    """``[nats] jetstream_replicas``: 0 (automatic) or 1..5."""
    if not 0 <= replicas <= MAX_REPLICAS:
        raise BadRequestError(
            f"jetstream_replicas must be 0 (3 on a cluster of 3 or more nodes, else 1) or 1..{MAX_REPLICAS}",
            field="nats.jetstream_replicas",
        )


def replicas_for(configured: int, cluster_nodes: int) -> int:
    """The replicas of a stream made now: ``configured`` when set, else 3 on a cluster of at least
    3 nodes and 1 otherwise (a lone server cannot hold more)."""
    check_replicas(configured)
    if configured:
        return configured
    return CLUSTER_QUORUM if cluster_nodes >= CLUSTER_QUORUM else 1
