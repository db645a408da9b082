"""Prefect 3 flows around the DVC pipeline: ``reproduce``, ``retrain`` and ``inspect``.

They run with no Prefect server (ephemeral mode: Prefect starts a temporary local API) or against
a server when ``PREFECT_API_URL`` is set. See README "Flows".
"""
