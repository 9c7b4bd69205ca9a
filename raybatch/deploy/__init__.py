"""Deployment configs shipped with the package: `serve.yaml`, a Ray Serve config for `serve deploy`."""
