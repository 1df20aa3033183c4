"""The supervisor (`iotdlm up`, `mode set`, `status`): starts the embedded nats-server and exactly
the services Table 1 turns on, restarts them with backoff, switches modes (drain, then start), and
is the only writer of the signed mode record. Services check the mode themselves with
:mod:`iotdlm.modes` (Table 1, the record, the guard), which sits below every service; this package
sits above them all, under the CLI.

- :mod:`.supervisor`: the supervisor and the switch;
- :mod:`.processes`: the processes it runs (the services, the embedded nats-server), the restart policy;
- :mod:`.storage`: what it uses of the store (the audit log).
"""
