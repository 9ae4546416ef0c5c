"""Google Cloud clients and the semantics bqx builds on them: storage preconditions, exactly-once launches,
the Run API call."""
