"""The commands, torch-free at import (`--help` and bad flags answer at once): each command's flags and wiring
(train_effnet, train_genconvit, extract_features; torchrun), and the parsing they share: cli (--config and --demo
defaults, one-line errors and exit codes), flags (flag types and their ranges), train_args (the trainers' shared
flags, turned into a TrainConfig).

The top-level scripts (train_stage2_effnet.py, train_stage2_genconvit.py, feature_extractor.py) and the installed
commands (pyproject's [project.scripts]) run them; benchmarks call their `main` to run a trainer as a user does.
"""
