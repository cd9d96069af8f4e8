"""The applications: the `dualmode` command (cli.py), the tutorial, the bench, and the models and data they use.

They use dualmode's public API (`import dualmode as dm`) only, never the step's or graph mode's internals.
"""
