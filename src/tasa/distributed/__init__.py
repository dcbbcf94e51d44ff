"""Measurements spread over a cluster (Ray): the optional ``tasa[distributed]`` extra.

``cluster`` connects to (or starts) a Ray cluster and runs a pool of actors that each own one device and retry
the work of a worker that died; ``probes`` runs the sensitivity probes of tasa.profile.probe on such a pool.
Nothing here is imported unless ``--distributed ray`` is asked for.
"""
