"""Bridges to other frameworks; each submodule imports its framework and fails with an install hint without it.

- :mod:`vpeft.integrations.mmseg`: vpeft-adapted backbones in mmsegmentation's ``MODELS`` registry.
"""
