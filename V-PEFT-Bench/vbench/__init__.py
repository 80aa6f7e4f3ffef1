"""The benchmark harness behind ``V-PEFT-Bench/run.py``: suites, protocols, runs, leaderboard maths, plots, report.

Imports point one way: ``vbench`` uses ``vpeft.engine`` (``load_config``, ``train``) and ``vpeft.data`` (task tables);
nothing in ``vpeft`` imports it.
"""
