"""FastFlow, CFlow-AD, CS-Flow and DifferNet: invertible, with exact log-determinants, and latents shaped like their features."""

import json
import logging
from dataclasses import replace

import pytest
import torch

from conftest import TINY_DETECTOR
from uflow_batch.checkpoint import MANIFEST_FILE, load_detector, save_detector
from uflow_batch.config import ConfigError, FlowConfig
from uflow_batch.model import UFlowDetector
from uflow_batch.model.anomaly import anomaly_map
from uflow_batch.model.scan_nfa import cell_energy
from uflow_batch.model.views import VIEWS
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


@pytest.fixture(scope="module")
def differnet_detector() -> UFlowDetector:
    """A DifferNet detector on the tiny backbone, its flow moved off the identity."""
    torch.manual_seed(5)
    detector = UFlowDetector(replace(TINY_DETECTOR, kind="differnet")).eval()
    randomized(detector.flow, scale=0.05)
    return detector


def single_view_latent(detector: UFlowDetector, images: torch.Tensor) -> torch.Tensor:
    """The flow's latent of the images as they are, without views."""
    with torch.inference_mode():
        return detector.flow(detector.extractor(detector.normalize(images)))[0][0]


def symmetric_images(count: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images equal to their own horizontal and vertical flips (so to their 180-degree rotation too)."""
    quarter = torch.randint(0, 256, (count, 3, size[0] // 2, size[1] // 2), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(6))
    top = torch.cat([quarter, quarter.flip(-1)], dim=-1)
    return torch.cat([top, top.flip(-2)], dim=-2)


def test_only_differnet_scores_test_time_views_and_declares_their_latent():
    assert DifferNet.test_views == 4
    assert UFlow.test_views == FastFlow.test_views == CFlow.test_views == CSFlow.test_views == 1
    detector = UFlowDetector(replace(TINY_DETECTOR, kind="differnet"))
    (dims, _, _), = detector.flow.latent_shapes
    assert detector.latent_shapes == [(4 * dims, 1, 1)] == detector.nfa.latent_shapes


def test_views_of_an_image_symmetric_under_them_give_its_single_view_latent(differnet_detector):
    images = symmetric_images(2, differnet_detector.input_size)
    assert all(torch.equal(view(images), images) for view in VIEWS)
    with torch.inference_mode():
        (combined,), _ = differnet_detector.latents(differnet_detector.features(images))
    single = single_view_latent(differnet_detector, images)
    for part in combined.chunk(4, dim=1):
        torch.testing.assert_close(part, single)
    torch.testing.assert_close(anomaly_map([combined], (8, 8)), anomaly_map([single], (8, 8)))


def test_the_combined_latents_energy_is_the_views_energies_summed(differnet_detector):
    """sum z^2 of the combined latent = 4 x the mean of the views' energies (the paper's average); log-dets add up."""
    images = torch.randint(0, 256, (3, 3, *differnet_detector.input_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        (combined,), log_det = differnet_detector.latents(differnet_detector.features(images))
        per_view = [differnet_detector.flow(differnet_detector.extractor(differnet_detector.normalize(view(images))))
                    for view in VIEWS]
    energies = torch.stack([cell_energy(latents[0]) for latents, _ in per_view])  # (V, B, 1, 1)
    assert energies.std(dim=0).max() > 1e-3, "the views are different images"
    torch.testing.assert_close(cell_energy(combined), 4 * energies.mean(dim=0))
    torch.testing.assert_close(log_det, torch.stack([d for _, d in per_view]).sum(dim=0))
    dims = differnet_detector.flow.latent_shapes[0][0]
    expected_map = 1 - torch.exp(-0.5 * energies.mean(dim=0).float() / dims)  # the anomaly map of the averaged views
    torch.testing.assert_close(anomaly_map([combined], (1, 1)), expected_map)


def test_a_checkpoint_keeps_the_views_and_refuses_a_calibration_of_single_views(differnet_detector, tmp_path, caplog):
    images = torch.randint(0, 256, (12, 3, *differnet_detector.input_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(8))
    detector = UFlowDetector(differnet_detector.config, extractor=differnet_detector.extractor).eval()
    detector.flow.load_state_dict(differnet_detector.flow.state_dict())
    detector.nfa.calibration = detector.calibrate(detector.features(images), batch_size=4)
    save_detector(detector, tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / MANIFEST_FILE).read_text())
    assert [tuple(s) for s in manifest["latent_shapes"]] == detector.latent_shapes
    loaded = load_detector(tmp_path / "model")
    assert loaded.views == 4 and loaded.nfa.calibration == detector.nfa.calibration
    first, again = detector.score_maps(images[:2]), loaded.score_maps(images[:2])
    assert torch.equal(first.significance, again.significance) and torch.equal(first.anomaly, again.anomaly)

    # A DifferNet saved before the views: calibrated on one view's latents, it loads uncalibrated.
    manifest["latent_shapes"] = [list(s) for s in detector.flow.latent_shapes]
    (tmp_path / "model" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="uflow_batch.checkpoint"):
        old = load_detector(tmp_path / "model")
    assert old.nfa.calibration != detector.nfa.calibration and "uflow-batch calibrate" in caplog.text


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
