"""Just-in-time approval of risky statements: requests, votes, holds and their store."""
