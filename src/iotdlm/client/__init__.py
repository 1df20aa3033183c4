"""Clients of the modules' bus APIs, for other modules, devices (through cm) and operator tools."""
