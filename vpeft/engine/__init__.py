"""Training runs: the run-config schema and loader (:mod:`vpeft.engine.config`) and the training loop."""
