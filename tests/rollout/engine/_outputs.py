"""Shared by the engine tests: two engine outputs are the same (tokens, log-probs, trace; optionally the finish)."""

from __future__ import annotations

import numpy as np


def same_output(a, b, *, finish: bool = True) -> None:
    """Bitwise the same output ids, log-probs and routing trace (and request id and finish reason, with `finish`)."""
    if finish:
        assert (a.request_id, a.finish_reason) == (b.request_id, b.finish_reason)
    assert a.output_ids == b.output_ids, (a.request_id, a.output_ids, b.output_ids)
    assert a.output_logprobs == b.output_logprobs, a.request_id
    np.testing.assert_array_equal(a.trace.expert_ids, b.trace.expert_ids)
