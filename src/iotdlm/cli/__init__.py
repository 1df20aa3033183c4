"""The ``iotdlm`` command line."""
