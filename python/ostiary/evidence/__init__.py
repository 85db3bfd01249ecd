"""SOC 2 evidence packs built from the audit trail (``ostiary evidence``)."""
