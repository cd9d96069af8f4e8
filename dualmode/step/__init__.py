"""The training step: TrainGraph, StepConfig, what build() returns, and the policy both modes share.

May import dualmode.groups. Graph mode (dualmode.graph) is imported on the first graph-mode call only.
"""
