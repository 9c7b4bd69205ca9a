"""Batch inference jobs: the state machine (`states`), the scheduler actor
(`scheduler`) and the per-job pipeline driver (`driver`)."""
