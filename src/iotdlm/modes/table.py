"""The paper's Table 1 (section 5.1.2): which module runs in which operation mode. Pure.

| mode                      | cm  | sm        | km  | pm  |
|---------------------------|-----|-----------|-----|-----|
| provisioning-software     | off | on (opt.) | off | on  |
| provisioning-certificate  | off | off       | on  | on  |
| software-management       | on  | on        | off | off |
| certificate-management    | on  | off       | on  | off |

"off" means the process is not running (section 5.2.1: during provisioning cm and every module
not involved are disabled, so a remote attacker has nothing to talk to). pm runs one process per
device type (dtype) of the deployment.

The command that starts each module comes from a :data:`CommandTable` -- a template per module,
so tests (and operators who wrap a service) can replace it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from iotdlm.errors import BadRequestError


class Mode(StrEnum):
    """An operation mode: a row of Table 1."""

    PROVISIONING_SOFTWARE = "provisioning-software"
    PROVISIONING_CERTIFICATE = "provisioning-certificate"
    SOFTWARE_MANAGEMENT = "software-management"
    CERTIFICATE_MANAGEMENT = "certificate-management"


class State(StrEnum):
    """A cell of Table 1."""

    ON = "on"
    OFF = "off"
    #: sm in provisioning-software: pm loads software from sm's local repository, so an operator
    #: may keep sm running (``--with-sm``); without it pm cannot load new software then
    OPTIONAL = "on (opt.)"


#: the columns of Table 1
MODULES: Final = ("cm", "sm", "km", "pm")

#: the order services start in (they stop in reverse): km, the CA the others ask, first; cm, the
#: door to the outside, last -- so the door opens once everything behind it runs, and closes first
START_ORDER: Final = ("km", "sm", "pm", "cm")

_ON, _OFF, _OPT = State.ON, State.OFF, State.OPTIONAL

#: Table 1, cell by cell
TABLE: Final[Mapping[Mode, Mapping[str, State]]] = MappingProxyType(
    {
        Mode.PROVISIONING_SOFTWARE: MappingProxyType({"cm": _OFF, "sm": _OPT, "km": _OFF, "pm": _ON}),
        Mode.PROVISIONING_CERTIFICATE: MappingProxyType({"cm": _OFF, "sm": _OFF, "km": _ON, "pm": _ON}),
        Mode.SOFTWARE_MANAGEMENT: MappingProxyType({"cm": _ON, "sm": _ON, "km": _OFF, "pm": _OFF}),
        Mode.CERTIFICATE_MANAGEMENT: MappingProxyType({"cm": _ON, "sm": _OFF, "km": _ON, "pm": _OFF}),
    }
)

# --- what the services check themselves (defence in depth, with :class:`ModeGuard`) -----------

#: km serves pm's certificate requests (Scenario 2, section 4.2.2) only here
DEVICE_CERTIFICATE_MODES: Final = frozenset({Mode.PROVISIONING_CERTIFICATE})
#: pm flashes software (Algorithm 1) only here
FLASH_MODES: Final = frozenset({Mode.PROVISIONING_SOFTWARE})


def modes_where(module: str) -> frozenset[Mode]:
    """The modes in which ``module`` may run (on or optional)."""
    if module not in MODULES:
        raise ValueError(f"unknown module {module!r}; Table 1 has {', '.join(MODULES)}")
    return frozenset(m for m, row in TABLE.items() if row[module] is not State.OFF)


def parse_mode(text: str) -> Mode:
    """The mode named ``text``; a :class:`BadRequestError` listing the modes otherwise."""
    try:
        return Mode(text)
    except ValueError:
        raise BadRequestError(
            f"unknown mode {text!r}; the modes are {', '.join(m.value for m in Mode)}", field="mode"
        ) from None


def modules_on(mode: Mode, *, with_sm: bool) -> tuple[str, ...]:
    """The modules that run in ``mode``, in :data:`START_ORDER`; ``with_sm`` turns the optional
    cell (sm in provisioning-software) on."""
    row = TABLE[mode]
    return tuple(m for m in START_ORDER if row[m] is State.ON or (row[m] is State.OPTIONAL and with_sm))


# --- commands -----------------------------------------------------------------------------------

#: module -> command template. Placeholders (nothing else in braces is touched, so a template may
#: hold a ``python -c`` script): ``{python}`` this interpreter, ``{data}`` the deployment folder,
#: ``{name}`` the service (km, sm, cm, pm-<dtype>), ``{module}``, ``{dtype}`` (pm only).
CommandTable = Mapping[str, Sequence[str]]

_SERVE = ("{python}", "-m", "iotdlm.cli.main")
#: the command table's entry for the operator console
CONSOLE: Final = "console"
DEFAULT_COMMANDS: Final[CommandTable] = MappingProxyType(
    {
        "km": (*_SERVE, "km", "serve", "--data", "{data}"),
        "sm": (*_SERVE, "sm", "serve", "--data", "{data}"),
        "cm": (*_SERVE, "cm", "serve", "--data", "{data}"),
        "pm": (*_SERVE, "pm", "serve", "--data", "{data}", "--dtype", "{dtype}"),
        # not a module of Table 1: the operator console runs in every mode (docs/adr/0030); a
        # table without it (tests, the demo) starts no console
        CONSOLE: (*_SERVE, "console", "serve", "--data", "{data}"),
    }
)

_PLACEHOLDER = re.compile(r"\{(python|data|name|module|dtype)\}")


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: ``name`` is also its log file (``logs/<name>.log``) and its NATS identity."""

    name: str
    module: str
    dtype: str | None
    argv: tuple[str, ...]


def service_name(module: str, dtype: str | None) -> str:
    return f"{module}-{dtype}" if dtype else module


def render_command(template: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """``template`` with its placeholders filled from ``values``."""
    if not template:
        raise ValueError("a command template needs at least the program")

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise ValueError(f"placeholder {{{key}}} has no value here (dtype is for pm only)")
        return values[key]

    return tuple(_PLACEHOLDER.sub(fill, arg) for arg in template)


def check_commands(commands: CommandTable) -> None:
    """Every module of Table 1 needs a non-empty template of strings."""
    missing = [m for m in MODULES if m not in commands]
    if missing:
        raise ValueError(f"the command table has no command for {', '.join(missing)}")
    for module, template in commands.items():
        if isinstance(template, str) or not template or not all(isinstance(a, str) for a in template):
            raise ValueError(f"the command of {module} must be a non-empty list of strings")


def services(
    modules: Sequence[str], *, dtypes: Sequence[str], commands: CommandTable, data: str, python: str
) -> list[ServiceSpec]:
    """The processes that run ``modules`` (one pm per dtype), in the order given."""
    out: list[ServiceSpec] = []
    for module in modules:
        for dtype in dtypes if module == "pm" else [None]:
            name = service_name(module, dtype)
            values = {"python": python, "data": data, "name": name, "module": module}
            if dtype is not None:
                values["dtype"] = dtype
            out.append(ServiceSpec(name, module, dtype, render_command(commands[module], values)))
    return out


#: the default commands less the console: for a supervisor that needs no operator (the demo's run)
WITHOUT_CONSOLE: Final[CommandTable] = MappingProxyType({k: v for k, v in DEFAULT_COMMANDS.items() if k != CONSOLE})


def chosen_services(running: Mapping[str, str], names: Sequence[str], mode: str) -> frozenset[str]:
    """The services ``names`` stand for among ``running`` (service name -> its module): a service's
    name (``pm-board-a``) or a module's (``pm``: each of its services). Refuses none, and any name
    that stands for no running service, naming what runs."""
    if not names:
        raise BadRequestError("name the services to restart (as `iotdlm status` lists them)", field="services")
    unknown = [n[:64] for n in names if not any(n in (svc, module) for svc, module in running.items())]
    if unknown:
        raise BadRequestError(
            f"not running in {mode}: {', '.join(unknown)} (running: {', '.join(running) or 'nothing'})",
            field="services",
        )
    return frozenset(svc for svc, module in running.items() if svc in names or module in names)
