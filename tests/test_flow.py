"""The U-shaped flow: invertible, with an exact log-determinant, and stable to save."""

import numpy as np
import pytest
import torch

from uflow_batch.config import ConfigError, FlowConfig
from uflow_batch.model.flow import UFlow, channels_to_upsample

TINY = [(3, 4, 4), (6, 2, 2), (16, 1, 1)]  # finest first; 88 dimensions in all
LITE0 = [(40, 32, 32), (112, 16, 16), (320, 8, 8)]


def randomized(flow: UFlow, scale: float = 0.2) -> UFlow:
    """Move every trainable parameter away from its identity initialization."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return flow


def test_latents_are_ordered_finest_first_with_half_the_channels_split_off():
    flow = UFlow(LITE0, FlowConfig())
    # 320 -> 160 out, 160 up = 40 channels at 16x16, +112 = 152 -> 76 out, 76 up = 19 at 32x32, +40 = 59.
    assert flow.latent_shapes == [(59, 32, 32), (76, 16, 16), (160, 8, 8)]
    latents, log_det = flow([torch.randn(2, *s) for s in LITE0])
    assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes
    assert log_det.shape == (2,)
    dims = lambda shapes: sum(c * h * w for c, h, w in shapes)  # noqa: E731
    assert dims(flow.latent_shapes) == dims(LITE0), "an invertible map keeps the dimension"


def test_inverse_of_forward_is_the_identity():
    torch.manual_seed(0)
    flow = randomized(UFlow(LITE0, FlowConfig(steps_per_stage=2))).double()
    normalized = flow.standardize([torch.randn(2, *s, dtype=torch.float64) for s in LITE0])
    latents, _ = flow.transform(normalized)
    for original, recovered in zip(normalized, flow.inverse(latents)):
        torch.testing.assert_close(recovered, original, rtol=1e-9, atol=1e-9)


def test_inverse_holds_in_float32_too():
    flow = randomized(UFlow(TINY, FlowConfig()))
    normalized = [torch.randn(3, *s) for s in TINY]
    latents, _ = flow.transform(normalized)
    for original, recovered in zip(normalized, flow.inverse(latents)):
        torch.testing.assert_close(recovered, original, rtol=1e-5, atol=1e-5)


def test_log_determinant_equals_the_numerical_jacobian():
    torch.manual_seed(1)
    np.random.seed(0)  # FrEIA draws its channel permutations from numpy
    flow = randomized(UFlow(TINY, FlowConfig(steps_per_stage=2)), scale=0.5).double()
    sizes = [c * h * w for c, h, w in TINY]
    x = torch.randn(sum(sizes), dtype=torch.float64)

    def as_latent_vector(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        features = [part.view(1, *shape) for part, shape in zip(parts, TINY)]
        latents, _ = flow.transform(features)
        return torch.cat([z.flatten() for z in latents])

    jacobian = torch.autograd.functional.jacobian(as_latent_vector, x)
    _, expected = torch.linalg.slogdet(jacobian)
    _, log_det = flow.transform([p.view(1, *s) for p, s in zip(torch.split(x, sizes), TINY)])
    assert log_det.item() == pytest.approx(expected.item(), rel=1e-8, abs=1e-8)
    assert abs(expected.item()) > 1.0, "the randomized flow must not be volume preserving"


def test_each_stage_has_the_configured_steps_with_alternating_kernels():
    flow = UFlow(TINY, FlowConfig(steps_per_stage=3, subnet_kernels=(3, 1)))
    steps = {name: module for name, module in flow.nodes.items() if name.startswith("step_")}
    assert len(steps) == 3 * len(TINY)
    kernels = [steps[f"step_0_{i}"].subnet[0].kernel_size[0] for i in range(3)]
    assert kernels == [3, 1, 3]
    assert all(s.subnet[0].out_channels == s.subnet[0].in_channels for s in steps.values()), "hidden = input channels"


def test_parameter_names_are_stable_across_constructions():
    # FrEIA orders its modules differently from one build to the next; saved
    # weights must still load into a freshly built flow.
    first = list(UFlow(LITE0, FlowConfig()).state_dict())
    for _ in range(3):
        assert list(UFlow(LITE0, FlowConfig()).state_dict()) == first


def test_scales_that_do_not_halve_are_rejected():
    with pytest.raises(ConfigError, match="halve"):
        UFlow([(8, 16, 16), (16, 6, 6)], FlowConfig())


def test_channels_passed_on_are_a_multiple_of_four():
    assert [channels_to_upsample(c) for c in (320, 152, 10, 7)] == [160, 76, 4, 0]
