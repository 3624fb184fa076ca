"""The source side: the migration state machine, policy, preflight and the operator's report."""
