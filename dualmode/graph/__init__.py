"""Graph mode: the whole step (forward, backward, update) traced into one GraphModule and compiled.

runner.py (cache, recompiles), inputs.py (input slots, cache key), trace.py (make_fx of the step),
updates.py (traced update rules), remat.py (recompute pass), report.py (explain(), warnings, errors).
Only report.py is imported with `import dualmode`; the rest loads dynamo and inductor on the first
graph-mode call. Graph mode adds to dualmode.step and dualmode.groups; they never import it.
"""
