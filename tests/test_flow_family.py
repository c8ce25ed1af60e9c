"""FastFlow, CFlow-AD, CS-Flow and DifferNet: invertible, with exact log-determinants, and latents shaped like their features."""

import pytest
import torch

from uflow_batch.config import ConfigError, FlowConfig
from uflow_batch.model.cflow import CONDITION_DIMS, CFlow, positional_encoding
from uflow_batch.model.csflow import CSFlow
from uflow_batch.model.differnet import DifferNet
from uflow_batch.model.fastflow import FastFlow
from uflow_batch.model.flow import UFlow

from test_flow import randomized

TINY = [(3, 4, 4), (6, 2, 2), (16, 1, 1)]  # finest first
KINDS = [FastFlow, CFlow, CSFlow, DifferNet]


def transform_shapes(flow) -> list[tuple[int, ...]]:
    """The shapes the invertible part takes: the features' own, or DifferNet's pooled vector."""
    return [tuple(x.shape[1:]) for x in flow.standardize([torch.zeros(1, *s) for s in TINY])]


@pytest.mark.parametrize("kind", [FastFlow, CFlow, CSFlow])
def test_latents_have_the_shapes_of_their_features(kind):
    flow = kind(TINY, FlowConfig(steps_per_stage=2))
    assert flow.latent_shapes == TINY
    latents, log_det = flow([torch.randn(2, *s) for s in TINY])
    assert [tuple(z.shape[1:]) for z in latents] == TINY and log_det.shape == (2,)


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_of_forward_is_the_identity(kind):
    torch.manual_seed(0)
    flow = randomized(kind(TINY, FlowConfig(steps_per_stage=3)), scale=0.3).double()
    normalized = flow.standardize([torch.randn(2, *s, dtype=torch.float64) for s in TINY])
    assert [tuple(x.shape[1:]) for x in normalized] == transform_shapes(flow)
    latents, _ = flow.transform(normalized)
    for original, recovered in zip(normalized, flow.inverse(latents)):
        torch.testing.assert_close(recovered, original, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_log_determinant_equals_the_numerical_jacobian(kind):
    torch.manual_seed(1)
    flow = randomized(kind(TINY, FlowConfig(steps_per_stage=2)), scale=0.5).double()
    shapes = transform_shapes(flow)
    sizes = [c * h * w for c, h, w in shapes]
    x = torch.randn(sum(sizes), dtype=torch.float64)

    def features(flat):
        return [part.view(1, *shape) for part, shape in zip(torch.split(flat, sizes), shapes)]

    jacobian = torch.autograd.functional.jacobian(lambda flat: torch.cat([z.flatten() for z in flow.transform(features(flat))[0]]), x)
    _, expected = torch.linalg.slogdet(jacobian)
    _, log_det = flow.transform(features(x))
    assert log_det.item() == pytest.approx(expected.item(), rel=1e-8, abs=1e-8)
    assert abs(expected.item()) > 0.1, "the randomized flow must not be volume preserving"


@pytest.mark.parametrize("kind", KINDS)
def test_weights_load_into_a_freshly_built_flow_and_give_the_same_latents(kind):
    torch.manual_seed(2)
    trained = randomized(kind(TINY, FlowConfig(steps_per_stage=2)), scale=0.3)
    torch.manual_seed(3)  # different random permutations at construction
    fresh = kind(TINY, FlowConfig(steps_per_stage=2))
    fresh.load_state_dict(trained.state_dict(), strict=True)
    features = [torch.randn(2, *s) for s in TINY]
    for a, b in zip(trained(features)[0], fresh(features)[0]):
        torch.testing.assert_close(a, b)


def test_differnet_sees_one_pooled_vector_per_image_and_gives_no_mask():
    flow = DifferNet(TINY, FlowConfig(steps_per_stage=2))
    assert flow.latent_shapes == [(3 + 6 + 16, 1, 1)] and not flow.localizes
    assert UFlow.localizes and FastFlow.localizes and CFlow.localizes and CSFlow.localizes, "every other kind keeps positions"
    features = [torch.randn(2, *s) for s in TINY]
    shuffled = [f.flip(-1).flip(-2) for f in features]
    torch.testing.assert_close(flow(features)[0][0], flow(shuffled)[0][0], msg="where a feature is does not matter")


def test_only_the_flows_of_all_scales_jointly_make_their_scales_independent():
    assert UFlow.scales_independent and CSFlow.scales_independent
    assert not FastFlow.scales_independent and not CFlow.scales_independent


def test_fastflow_steps_alternate_the_configured_kernels():
    flow = FastFlow(TINY, FlowConfig(steps_per_stage=3, subnet_kernels=(3, 1)))
    steps = list(flow.scales[0].module_list)[1:]  # after the per-position affine
    assert [step.subnet[0].kernel_size[0] for step in steps] == [3, 1, 3]


def test_cflow_conditions_every_position_on_where_it_is():
    encoding = positional_encoding(CONDITION_DIMS, 4, 6)
    assert encoding.shape == (CONDITION_DIMS, 4, 6)
    vectors = encoding.flatten(1).T
    assert torch.cdist(vectors, vectors).add(torch.eye(24) * 1e3).min() > 0.1, "no two positions share an encoding"
    flow = randomized(CFlow([(3, 4, 6)], FlowConfig(steps_per_stage=2)), scale=0.3)
    same_feature_everywhere = torch.ones(1, 3, 4, 6)
    per_position = flow.transform([same_feature_everywhere])[0][0][0].flatten(1).T.detach()
    distances = torch.cdist(per_position, per_position) + torch.eye(24) * 1e3
    assert distances.min() > 1e-3, "equal features at different places get different latents"


def test_csflow_couples_every_scale_with_its_neighbours():
    """A change on one scale moves the latents of the scales next to it, not only its own."""
    torch.manual_seed(4)
    flow = randomized(CSFlow(TINY, FlowConfig(steps_per_stage=1)), scale=0.3).double()
    features = [torch.randn(1, *s, dtype=torch.float64) for s in TINY]
    before = flow.transform(features)[0]
    nudged = [features[0], features[1] + 0.5, features[2]]
    after = flow.transform(nudged)[0]
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(before, after)), "one block reaches the finer and the coarser scale"


def test_csflow_needs_halving_scales_of_at_least_two_channels():
    with pytest.raises(ConfigError, match="halve"):
        CSFlow([(4, 4, 4), (4, 4, 4)], FlowConfig())
    with pytest.raises(ConfigError, match="fewer than 2"):
        CSFlow([(4, 4, 4), (1, 2, 2)], FlowConfig())
