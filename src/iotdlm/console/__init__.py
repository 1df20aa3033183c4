"""The operator console (issue 18, docs/adr/0030-operator-console.md): a web page per task -- the
fleet, a device and its revocation, the CAs and their CRLs, the operation mode, the audit log and
its verification, health and metrics -- served over HTTPS with the admin client certificate as the
only login, acting exactly as the CLI acts (the same clients, the same signed requests, the same
audit records). Its own process, started by the supervisor in every mode, never by cm."""
