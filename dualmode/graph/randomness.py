"""Random numbers in graph mode: the compiled step draws exactly what eager mode draws.

Inductor generates its own random numbers (a Philox stream seeded from torch's generator) unless
`fallback_random` is set, so dropout masks would differ from eager mode's, and differently for each shape.
Graph mode sets it while the step compiles: the compiled step then calls aten's own random ops on torch's
global generator, in the order of the trace, which is the order eager mode calls them. The aot_eager and
eager backends run aten's ops anyway. A `fallback_random` of the user's own in
`compile_options["options"]` is applied by torch.compile inside this and so replaces it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch._inductor import config as inductor_config


def eager_random() -> AbstractContextManager:
    """Inductor's config with fallback_random on, for the call that compiles."""
    return inductor_config.patch(fallback_random=True)
