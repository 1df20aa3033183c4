"""Table 1 of the paper, the service plan per mode, and the command templates."""

from __future__ import annotations

import pytest

from iotdlm.errors import BadRequestError
from iotdlm.modes.table import (
    DEFAULT_COMMANDS,
    DEVICE_CERTIFICATE_MODES,
    FLASH_MODES,
    MODULES,
    START_ORDER,
    TABLE,
    Mode,
    ServiceSpec,
    State,
    check_commands,
    chosen_services,
    modes_where,
    modules_on,
    parse_mode,
    render_command,
    services,
)

# Table 1 as printed in the paper (section 5.1.2): cm, sm, km, pm
PAPER = {
    "provisioning-software": ("off", "on (opt.)", "off", "on"),
    "provisioning-certificate": ("off", "off", "on", "on"),
    "software-management": ("on", "on", "off", "off"),
    "certificate-management": ("on", "off", "on", "off"),
}


def test_table_is_the_papers_table_1() -> None:
    assert MODULES == ("cm", "sm", "km", "pm")
    assert {m.value for m in TABLE} == set(PAPER)
    for mode, row in TABLE.items():
        assert tuple(row[c].value for c in MODULES) == PAPER[mode.value], mode


def test_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        TABLE[Mode.PROVISIONING_CERTIFICATE]["cm"] = State.ON  # type: ignore[index]
    with pytest.raises(TypeError):
        TABLE[Mode.SOFTWARE_MANAGEMENT] = {}  # type: ignore[index]


@pytest.mark.parametrize(
    ("mode", "with_sm", "expected"),
    [
        (Mode.PROVISIONING_SOFTWARE, False, ("pm",)),
        (Mode.PROVISIONING_SOFTWARE, True, ("sm", "pm")),
        (Mode.PROVISIONING_CERTIFICATE, False, ("km", "pm")),
        (Mode.PROVISIONING_CERTIFICATE, True, ("km", "pm")),  # sm is off, not optional, here
        (Mode.SOFTWARE_MANAGEMENT, False, ("sm", "cm")),  # sm is on, not optional, here
        (Mode.CERTIFICATE_MANAGEMENT, True, ("km", "cm")),
    ],
)
def test_modules_on_follows_the_table_in_start_order(mode: Mode, with_sm: bool, expected: tuple[str, ...]) -> None:
    assert modules_on(mode, with_sm=with_sm) == expected


def test_cm_never_runs_with_pm() -> None:
    # section 5.2.1: during provisioning the door to the outside is closed
    for mode in Mode:
        on = modules_on(mode, with_sm=True)
        assert not ("cm" in on and "pm" in on), mode


def test_cm_starts_last_and_km_first() -> None:
    assert START_ORDER[0] == "km"
    assert START_ORDER[-1] == "cm"
    assert set(START_ORDER) == set(MODULES)


def test_modes_where_and_guard_sets() -> None:
    assert modes_where("pm") == {Mode.PROVISIONING_SOFTWARE, Mode.PROVISIONING_CERTIFICATE}
    assert modes_where("km") == {Mode.PROVISIONING_CERTIFICATE, Mode.CERTIFICATE_MANAGEMENT}
    assert modes_where("sm") == {Mode.PROVISIONING_SOFTWARE, Mode.SOFTWARE_MANAGEMENT}
    assert modes_where("cm") == {Mode.SOFTWARE_MANAGEMENT, Mode.CERTIFICATE_MANAGEMENT}
    assert modes_where("km") & modes_where("pm") >= DEVICE_CERTIFICATE_MODES
    assert modes_where("pm") >= FLASH_MODES
    with pytest.raises(ValueError, match="unknown module"):
        modes_where("admin")


@pytest.mark.parametrize("text", ["", "provisioning", "PROVISIONING-SOFTWARE", "off", "certificate_management"])
def test_parse_mode_refuses_unknown_names_and_lists_the_modes(text: str) -> None:
    with pytest.raises(BadRequestError, match="provisioning-certificate") as info:
        parse_mode(text)
    assert info.value.field == "mode"


def test_parse_mode_accepts_every_mode() -> None:
    for mode in Mode:
        assert parse_mode(mode.value) is mode


def test_services_one_pm_per_dtype_with_default_commands() -> None:
    specs = services(
        modules_on(Mode.PROVISIONING_CERTIFICATE, with_sm=False),
        dtypes=["board-a", "board-b"],
        commands=DEFAULT_COMMANDS,
        data="/srv/iotdlm",
        python="/usr/bin/python3",
    )
    assert [s.name for s in specs] == ["km", "pm-board-a", "pm-board-b"]
    assert specs[0] == ServiceSpec(
        "km", "km", None, ("/usr/bin/python3", "-m", "iotdlm.cli.main", "km", "serve", "--data", "/srv/iotdlm")
    )
    assert specs[2].dtype == "board-b"
    assert specs[2].argv[-4:] == ("--data", "/srv/iotdlm", "--dtype", "board-b")


def test_services_without_dtypes_run_no_pm() -> None:
    specs = services(("km", "pm"), dtypes=[], commands=DEFAULT_COMMANDS, data="d", python="p")
    assert [s.name for s in specs] == ["km"]


def test_render_command_fills_only_known_placeholders() -> None:
    script = 'import sys; d = {"a": 1}; print("{x}", sys.argv)'
    argv = render_command(
        ["{python}", "-c", script, "{data}/{name}", "{module}:{dtype}"],
        {"python": "py", "data": "/d", "name": "pm-b", "module": "pm", "dtype": "b"},
    )
    assert argv == ("py", "-c", script, "/d/pm-b", "pm:b")


def test_render_command_needs_values_for_its_placeholders() -> None:
    with pytest.raises(ValueError, match="dtype"):
        render_command(["x", "{dtype}"], {"python": "p"})
    with pytest.raises(ValueError, match="at least the program"):
        render_command([], {})


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"km": ["x"], "sm": ["x"], "cm": ["x"]}, "no command for pm"),
        ({"km": ["x"], "sm": ["x"], "cm": ["x"], "pm": []}, "non-empty"),
        ({"km": ["x"], "sm": ["x"], "cm": ["x"], "pm": "python -m x"}, "non-empty list"),
        ({"km": ["x"], "sm": ["x"], "cm": ["x"], "pm": ["x", 1]}, "list of strings"),
    ],
)
def test_check_commands_refuses_bad_tables(table: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_commands(table)  # type: ignore[arg-type]


def test_default_commands_are_complete() -> None:
    check_commands(DEFAULT_COMMANDS)
    assert "{dtype}" in DEFAULT_COMMANDS["pm"]
    for module in MODULES:
        assert DEFAULT_COMMANDS[module][:3] == ("{python}", "-m", "iotdlm.cli.main")
        assert DEFAULT_COMMANDS[module][3:5] == (module, "serve")


def test_restart_names_a_service_or_a_module_and_refuses_what_does_not_run() -> None:
    running = {"km": "km", "pm-board-a": "pm", "pm-board-b": "pm"}
    assert chosen_services(running, ["pm"], "provisioning-certificate") == {"pm-board-a", "pm-board-b"}
    assert chosen_services(running, ["pm-board-b", "km"], "provisioning-certificate") == {"pm-board-b", "km"}
    with pytest.raises(BadRequestError, match=r"not running in provisioning-certificate: cm, pm-board-c \(running: km"):
        chosen_services(running, ["km", "cm", "pm-board-c"], "provisioning-certificate")
    with pytest.raises(BadRequestError, match="name the services to restart"):
        chosen_services(running, [], "provisioning-certificate")
    with pytest.raises(BadRequestError) as info:  # an operator's typo comes back, not a flood
        chosen_services(running, ["x" * 5000], "provisioning-certificate")
    assert "x" * 64 in info.value.message
    assert "x" * 65 not in info.value.message
