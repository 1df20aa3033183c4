"""Operation modes (the paper's Table 1) as every service sees them: which modules run in each mode
(:mod:`.table`), the mode record the supervisor signs (:mod:`iotdlm.wire.modes`, :mod:`.signed`), and the
guard services use to check the mode themselves (:mod:`.guard`).

Light to import, and below every service in the layers: the supervisor that runs Table 1 is
:mod:`iotdlm.supervisor`, the commands :mod:`iotdlm.cli.modes`.
"""

from iotdlm.modes.guard import ModeGuard, cm_running
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
from iotdlm.wire.modes import ModeRecord

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
