"""The resolver: rules -> torch.optim parameter groups (selectors, layer decay), and describe().

Imports torch only; nothing here knows about TrainGraph or graph mode.
"""
