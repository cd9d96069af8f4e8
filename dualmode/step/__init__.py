"""The training step: TrainGraph, StepConfig, what build() returns, the policy both modes share, and checkpoints
(state.py builds and checks a step's state, rng.py the generators' states, checkpoint.py the file).

May import dualmode.groups. Graph mode (dualmode.graph) is imported on the first graph-mode call only.
"""
