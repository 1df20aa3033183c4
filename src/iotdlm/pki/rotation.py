"""Issuing-CA rotation with an overlap period (issue 16; docs/adr/0026): pure, no I/O.

An issuing CA's *role* (factory, operational, service: what a profile names as its issuer) is
held by one or more *generations*. Generation 1 is named after its role (``operational``), so
certificates, CRL URLs and records from before any rotation keep their names; generation n is
``operational-n``. Rotating a role makes a new generation (new key, signed by the root) and sets
the one that was active aside:

- **active** -- the one generation of its role that issues;
- **rotated-out** -- issues no more end-entity certificates; listed in EST ``/cacerts`` (so
  devices keep trusting it) until ``overlap_until``; its CRLs and OCSP answers go on until its
  last certificate expires;
- **retired** -- the overlap is over and no certificate it issued is still valid.

The state of the generations lives in one small JSON document in the deployment's ``ca/``
folder (:func:`decode_generations` checks it whole); the dates come from the injected clock.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Sequence

import msgspec

from iotdlm.errors import BadRequestError, ConflictError

#: the roles a rotation applies to; the service CA's would re-issue every module identity: not yet
ROTATABLE_ROLES = ("factory", "operational")
DEFAULT_OVERLAP = dt.timedelta(days=30)
MAX_OVERLAP = dt.timedelta(days=3650)
#: the largest generations document read
MAX_DOCUMENT_BYTES = 64 * 1024
MAX_GENERATIONS = 100
_NAME = re.compile(r"^([a-z]+)(?:-([1-9][0-9]{0,2}))?$")


class CaState(enum.StrEnum):
    ACTIVE = "active"
    ROTATED_OUT = "rotated-out"
    RETIRED = "retired"


class Generation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One issuing CA of a role. ``rotated_at`` and ``overlap_until`` are None while it is active."""

    role: str
    number: int
    rotated_at: dt.datetime | None = None
    overlap_until: dt.datetime | None = None

    @property
    def name(self) -> str:
        return generation_name(self.role, self.number)

    @property
    def active(self) -> bool:
        return self.rotated_at is None

    def in_cacerts(self, now: dt.datetime) -> bool:
        """Whether EST ``/cacerts`` lists it (devices trust it): active, or still in its overlap."""
        return self.overlap_until is None or now < self.overlap_until

    def state(self, now: dt.datetime, last_expiry: dt.datetime | None) -> CaState:
        """Its state at ``now``; ``last_expiry``: the latest notAfter of the end-entity
        certificates it issued (None: it issued none)."""
        if self.active:
            return CaState.ACTIVE
        if self.in_cacerts(now) or (last_expiry is not None and now < last_expiry):
            return CaState.ROTATED_OUT
        return CaState.RETIRED


class _Document(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    generations: list[Generation]


def generation_name(role: str, number: int) -> str:
    """``operational`` for generation 1, ``operational-2`` after the first rotation."""
    return role if number == 1 else f"{role}-{number}"


def role_of(name: str) -> str:
    """The role of a generation name (``operational-2`` -> ``operational``)."""
    m = _NAME.match(name)
    return m.group(1) if m else name


def complete(generations: Sequence[Generation], roles: Iterable[str]) -> list[Generation]:
    """Every generation of every role: a role never rotated has its generation 1, active."""
    out = list(generations)
    for role in roles:
        if not any(g.role == role for g in out):
            out.append(Generation(role=role, number=1))
    return out


def active(generations: Sequence[Generation], role: str) -> Generation:
    for g in generations:
        if g.role == role and g.active:
            return g
    raise BadRequestError(f"no active {role} CA", field="ca")


def rotate(
    generations: Sequence[Generation], role: str, *, now: dt.datetime, overlap: dt.timedelta
) -> tuple[list[Generation], Generation]:
    """The generations after rotating ``role`` at ``now``, and the new active one. Refused for a
    role that cannot rotate, a bad overlap, or while the last rotation's overlap still runs."""
    if role not in ROTATABLE_ROLES:
        raise BadRequestError(
            f"the {role[:40]} CA cannot be rotated: give one of {', '.join(ROTATABLE_ROLES)} "
            "(rotating the service CA would re-issue every module identity; not supported yet)",
            field="ca",
        )
    if not dt.timedelta(0) <= overlap <= MAX_OVERLAP:
        raise BadRequestError(f"the overlap must be between 0 and {MAX_OVERLAP.days} days", field="overlap")
    gens = complete(generations, [role])
    for g in gens:
        if g.role == role and not g.active and g.in_cacerts(now):
            assert g.overlap_until is not None
            raise ConflictError(
                f"the {role} CA's last rotation is still in its overlap (until {g.overlap_until.isoformat()}); "
                "rotate again after it ends",
                field="ca",
            )
    current = active(gens, role)
    if current.number >= MAX_GENERATIONS:
        raise ConflictError(f"the {role} CA has had {MAX_GENERATIONS} generations; no more", field="ca")
    new = Generation(role=role, number=current.number + 1)
    out = [msgspec.structs.replace(g, rotated_at=now, overlap_until=now + overlap) if g == current else g for g in gens]
    out.append(new)
    return out, new


def encode_generations(generations: Sequence[Generation]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(_Document(version=1, generations=list(generations)))) + b"\n"


def decode_generations(data: bytes, roles: Sequence[str]) -> list[Generation]:
    """The generations document, checked whole: known roles, generations numbered 1..n per role,
    exactly one active (the newest), timezone-aware dates with the overlap after the rotation.
    BadRequestError saying what is wrong otherwise."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise BadRequestError(f"the CA generations document is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = msgspec.json.decode(data, type=_Document)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequestError(f"the CA generations document is not valid: {exc}") from None
    if doc.version != 1:
        raise BadRequestError(f"the CA generations document has version {doc.version}; this iotdlm reads 1")
    for role in {g.role for g in doc.generations}:
        if role not in roles:
            raise BadRequestError(f"the CA generations document names an unknown CA {role[:40]!r}")
        _check_role(sorted((g for g in doc.generations if g.role == role), key=lambda g: g.number), role)
    return complete(doc.generations, roles)


def _check_role(gens: list[Generation], role: str) -> None:
    if [g.number for g in gens] != list(range(1, len(gens) + 1)) or len(gens) > MAX_GENERATIONS:
        raise BadRequestError(f"the {role} CA's generations are not numbered 1, 2, ... without gaps")
    *older, newest = gens
    if not newest.active or newest.overlap_until is not None:
        raise BadRequestError(f"the {role} CA's newest generation is not the active one")
    for g in older:
        if g.rotated_at is None or g.overlap_until is None:
            raise BadRequestError(f"the {role} CA's generation {g.number} has no rotation date or overlap end")
        if g.rotated_at.tzinfo is None or g.overlap_until.tzinfo is None:
            raise BadRequestError(f"the {role} CA's generation {g.number} has a date without a time zone")
        if g.overlap_until < g.rotated_at:
            raise BadRequestError(f"the {role} CA's generation {g.number} ends its overlap before its rotation")


__all__ = [
    "DEFAULT_OVERLAP",
    "MAX_OVERLAP",
    "ROTATABLE_ROLES",
    "CaState",
    "Generation",
    "active",
    "complete",
    "decode_generations",
    "encode_generations",
    "generation_name",
    "role_of",
    "rotate",
]
