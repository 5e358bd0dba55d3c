"""Elastic submodels (ELMS): one set of weights reordered by importance so that every smaller
submodel is a prefix of each weight matrix; a request picks its level per step.

    spec.py        ElasticSpec: the levels and the widths each keeps per layer (no torch, no I/O)
"""
