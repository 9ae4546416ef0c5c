"""The completion stage: checkpoint inspection on arrival and the decision to launch the merge."""
