"""iotdlm.transfer: automated PKI trust transfer of a fleet from SP1/CA1 to SP2/CA2 (seed 003).

Pure (no I/O: bytes and a time in, a decision or new state and effects out):

- :mod:`~iotdlm.transfer.messages` -- UpdateInfoList (JWS over CBOR), x5bag, TransferMessage,
  per-device message and confirmation (COSE_Sign1 CWTs); the private claim keys are listed there;
- :mod:`~iotdlm.transfer.cose` -- COSE_Sign1 on ``cwt`` with bounded CBOR parsing;
- :mod:`~iotdlm.transfer.trust` -- chains to a truststore, pinned peers, device ids;
- :mod:`~iotdlm.transfer.sp1`, :mod:`~iotdlm.transfer.sp2`, :mod:`~iotdlm.transfer.device` -- the
  state machines of the old provider, the new provider and the device;
- :mod:`~iotdlm.transfer.attestation` -- evidence and verifier; :mod:`~iotdlm.transfer.status`.

I/O shell around them: :mod:`~iotdlm.transfer.shell` (SP1 and SP2 on their stores, CA2's
registration, CA1's revocation), :mod:`~iotdlm.transfer.agent` (the device agent),
:mod:`~iotdlm.transfer.identity` (the transfer signing identity in a deployment folder),
:mod:`~iotdlm.cli.transfer` (``iotdlm transfer``).
"""
