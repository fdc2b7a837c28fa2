"""scorerecon's numerical core: measurement physics, priors, samplers, baselines, metrics.

Knows nothing of HTTP, databases or queues.
"""
