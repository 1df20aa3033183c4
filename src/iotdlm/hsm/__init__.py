"""CA keys in a hardware security module over PKCS#11 (python-pkcs11; SoftHSM2 in the tests).

:func:`~iotdlm.hsm.uri.parse_pkcs11_uri` reads an RFC 7512 URI (pure), :func:`~iotdlm.hsm.token.open_token`
logs in to the token it names, :class:`~iotdlm.hsm.signer.Pkcs11Signer` is the CA's
:class:`~iotdlm.pki.keys.Signer` (ADR 0025). This package does I/O (the token), so it sits above
``pki`` and below ``deployment``.
"""

from iotdlm.hsm.signer import Pkcs11Signer
from iotdlm.hsm.token import PIN_ENV, Token, open_token, read_pin
from iotdlm.hsm.uri import Pkcs11Uri, parse_pkcs11_uri

__all__ = ["PIN_ENV", "Pkcs11Signer", "Pkcs11Uri", "Token", "open_token", "parse_pkcs11_uri", "read_pin"]
