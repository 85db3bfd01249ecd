"""The tamper-evident audit trail: records chained by SHA-256 per writer, Ed25519-signed
checkpoints, SQLite or PostgreSQL stores, verification, search and retention."""
