"""txfaas's outgoing HTTP: the connection pool (and, later, the client)."""
