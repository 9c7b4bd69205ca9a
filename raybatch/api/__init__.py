"""The control plane: a Ray Serve app (FastAPI ingress) speaking Fireworks' datasets
and batchInferenceJobs API. `app` holds the routes, `auth` the API keys, `datasets` and
`jobs` the logic behind the routes, `signing` the local upload/download URLs."""
