"""Batch inference jobs: the state machine (`states`), the scheduler actor
(`scheduler`) with what it leans on (`run_config`, `driver_control`, `handoff`,
`model_access`), and the per-job pipeline driver (`driver`)."""
