"""`dualmode bench`: command.py (arguments, run), variants.py, worker.py (one process per variant), machine.py,
report.py."""
