"""Google Cloud clients and the semantics bqx builds on them: storage preconditions, exactly-once launches,
the Run API call.

Public: `storage` (create-once, generations, listings), `claims` (launch_once, claim_own), `launch` (run_job),
`clients` (one client per process; is_transient, the one classifier of provider errors), `objectfile` (ranged
reads of one object generation).
"""

__all__ = ["claims", "clients", "launch", "objectfile", "storage"]
