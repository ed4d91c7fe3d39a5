"""Property test: for any n, t, shapes and dropout pattern the protocol either returns the
sum of the survivors' inputs (up to quantisation) or, with fewer than t sites left,
aborts with TooFewSitesError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmtl.privacy.secagg import Stage, TooFewSitesError, run_local_round

DROP_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK]


@st.composite
def scenarios(draw):
    n = draw(st.integers(min_value=2, max_value=6))
    t = draw(st.integers(min_value=2, max_value=n))
    shapes = tuple(
        tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
        for _ in range(draw(st.integers(1, 3)))
    )
    drops = draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(DROP_STAGES), max_size=n))
    seed = draw(st.integers(0, 2**16))
    return n, t, shapes, {f"site{i}": stage for i, stage in drops.items()}, seed


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenarios())
def test_sum_or_clean_abort(make_params, make_inputs, scenario):
    # Prepare
    n, t, shapes, dropouts, seed = scenario
    params, identities = make_params(n, t, shapes=shapes)
    inputs = make_inputs(params, seed)
    # sites whose masked input reaches the server / that answer the unmask request
    contributing = [s for s in params.sites if dropouts.get(s, Stage.UNMASK + 1) > Stage.MASKED_INPUT]
    answering = [s for s in params.sites if s not in dropouts]
    stage_counts = [
        sum(1 for s in params.sites if dropouts.get(s, Stage.UNMASK + 1) > stage) for stage in DROP_STAGES
    ]
    # Execute / Assert
    if min(stage_counts) < t:
        with pytest.raises(TooFewSitesError):
            run_local_round(params, identities=identities, inputs=inputs, dropouts=dropouts)
        return
    result = run_local_round(params, identities=identities, inputs=inputs, dropouts=dropouts)
    assert result.survivors == contributing
    assert len(answering) >= t
    for i, shape in enumerate(params.shapes):
        want = sum(inputs[s][i] for s in contributing)
        np.testing.assert_allclose(result.arrays[i], want, atol=n * 2**-16, rtol=0)
        assert result.arrays[i].shape == shape
