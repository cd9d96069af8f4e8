"""`dualmode tutorial`: command.py (arguments, run), train.py, evaluate.py, progress.py, report.py."""
