"""``iotdlm``: set up a deployment, run its services, operate its CA.

The root group only: each command group lives in its own module of this package and is imported
when it runs (see :mod:`iotdlm.cli.lazy`), so ``iotdlm --help`` costs little more than importing
click. Run as ``iotdlm`` or ``python -m iotdlm.cli.main`` (how the modes supervisor starts services).
"""

from __future__ import annotations

import logging

import click

from iotdlm import __version__
from iotdlm.cli.lazy import Lazy, LazyGroup

#: name -> where the command lives and the help ``iotdlm --help`` shows for it.
COMMANDS: dict[str, Lazy] = {
    "init": Lazy(
        "iotdlm.cli.init:init", "Create a deployment: root and issuing CAs, module identities, NATS credentials."
    ),
    "nats": Lazy("iotdlm.cli.nats_server:nats", "The embedded NATS server (loopback only, one user per module)."),
    "km": Lazy(
        "iotdlm.cli.km:km",
        "km: certificate authority, registration authority and (later) validation authority.",
    ),
    "ca": Lazy("iotdlm.cli.ca:ca", "Operate the CA directly from the data folder (the operator's tools)."),
    "device": Lazy(
        "iotdlm.cli.device:device",
        "Device lifecycle: revoke a device's certificates, decommission it, or run a simulated device.",
    ),
    "fleet": Lazy(
        "iotdlm.cli.fleet:fleet",
        "A fleet of simulated devices on the network: enrollment, re-enrollment, trust transfer.",
    ),
    "va": Lazy("iotdlm.cli.va:va", "Validation authority: ask for a certificate's status as a relying party would."),
    "audit": Lazy(
        "iotdlm.cli.audit:audit_group",
        "The tamper-evident audit log: who issued, revoked and refused what, and when.",
    ),
    "demo": Lazy(
        "iotdlm.cli.demo:demo", "Run the whole system end to end on the embedded default and print what happened."
    ),
    "repo": Lazy(
        "iotdlm.cli.repository:repo",
        "The software vendor's remote repository (TUF): publish releases per device type, serve them to sm, "
        "and keep sm's signed download reports.",
    ),
    "sm": Lazy(
        "iotdlm.cli.sm:sm",
        "sm: software management (Algorithm 2): check the vendor repository, verify, store for pm.",
    ),
    "cm": Lazy("iotdlm.cli.cm:cm", "cm: the only door to the outside -- EST, OCSP and CRLs in, sm's downloads out."),
    "pm": Lazy(
        "iotdlm.cli.pm:pm",
        "pm: the provisioning module -- flash verified software, truststore, config and device certificates "
        "into blank devices of one device type (Algorithm 1; Figs 3-5).",
    ),
    "transfer": Lazy(
        "iotdlm.cli.transfer:transfer",
        "Trust transfer: hand a fleet over to another provider (SP1) or take one over (SP2).",
    ),
    "up": Lazy(
        "iotdlm.cli.modes:up",
        "Start NATS and the services of a mode (Table 1); supervise them until Ctrl-C / SIGTERM.",
    ),
    "down": Lazy(
        "iotdlm.cli.modes:down",
        "Stop the running supervisor of a deployment: every service in reverse order, then NATS.",
    ),
    "mode": Lazy("iotdlm.cli.modes:mode", "The operation mode (the paper's Table 1): which modules run."),
    "backup": Lazy(
        "iotdlm.cli.backup:backup",
        "Back up the data folder and its database into one archive (services may keep running).",
    ),
    "restore": Lazy(
        "iotdlm.cli.backup:restore",
        "Restore a data folder and its database from an archive made by `iotdlm backup`.",
    ),
    "status": Lazy(
        "iotdlm.cli.modes:status",
        "The operation mode and each service's health, and why a service that is not running stopped.",
    ),
}


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="iotdlm")
@click.option("-v", "--verbose", is_flag=True, help="Log more (to stderr).")
def main(verbose: bool) -> None:
    """iotdlm: device-lifecycle security for IoT and industrial fleets.

    Start with `iotdlm demo`, or `iotdlm init --data DIR` for a deployment of your own.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


if __name__ == "__main__":
    main()
