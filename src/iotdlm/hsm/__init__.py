"""CA keys in a hardware security module over PKCS#11 (python-pkcs11; SoftHSM2 in the tests).

:mod:`~iotdlm.hsm.uri` reads an RFC 7512 URI and :mod:`~iotdlm.hsm.settings` the ``[hsm]``
settings (both pure); :mod:`~iotdlm.hsm.token` logs in to the token, :mod:`~iotdlm.hsm.signer`'s
``Pkcs11Signer`` is the CA's :class:`~iotdlm.pki.keys.Signer`, :mod:`~iotdlm.hsm.ca_keys` holds a
deployment's CA keys (ADR 0025). This package does I/O (the token), so it sits above ``pki`` and
below ``deployment``. Nothing is imported here: python-pkcs11 is loaded only where a CA key is used.
"""
