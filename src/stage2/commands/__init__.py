"""The three commands: argument parsing and wiring of each, torch-free at import (`--help` answers at once).

The top-level scripts (train_stage2_effnet.py, train_stage2_genconvit.py, feature_extractor.py) and the installed
commands (pyproject's [project.scripts]) run them; benchmarks call their `main` to run a trainer as a user does.
"""
