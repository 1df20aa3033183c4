"""Operation modes (the paper's Table 1): which modules run, the supervisor that runs them, and
the guard services use to check the mode themselves.

Light to import (services import :class:`ModeGuard`): the supervisor is
:mod:`iotdlm.modes.supervisor`, the commands :mod:`iotdlm.cli.modes`.
"""

from iotdlm.modes.guard import ModeGuard, cm_running
from iotdlm.modes.messages import ModeRecord
from iotdlm.modes.table import (
    DEFAULT_COMMANDS,
    DEVICE_CERTIFICATE_MODES,
    FLASH_MODES,
    TABLE,
    CommandTable,
    Mode,
    State,
    modes_where,
    modules_on,
    parse_mode,
)

__all__ = [
    "DEFAULT_COMMANDS",
    "DEVICE_CERTIFICATE_MODES",
    "FLASH_MODES",
    "TABLE",
    "CommandTable",
    "Mode",
    "ModeGuard",
    "ModeRecord",
    "State",
    "cm_running",
    "modes_where",
    "modules_on",
    "parse_mode",
]
