"""Cluster bring-up: launcher configs, KubeRay manifests, `bitlm cluster` and the local head's state file.

Imports nothing from the rest of the project (bitlm, pipelines, serve and tune may read the
recorded cluster through `cluster.state`, never the other way round), and nothing from ray or
mlflow at module level.
"""
