"""pretrain.objectives.clip: InfoNCE and SigLIP by hand, masking, gradients, metrics, validation."""

from __future__ import annotations

import math

import pytest
import torch

from fm3d.models.encoder import EncoderOutput
from fm3d.text import init_text_model
from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.clip import ClipObjective, infonce_loss, siglip_loss

REPORTS = [
    "Liver normal. No focal lesion.",
    "Right lower lobe nodule, 6 mm.",
    "Kidneys unremarkable.",
    "Ascites.",
]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("text")
    return str(init_text_model(folder, REPORTS * 3, vocab_size=120, hidden_size=16))


def _encoded(pooled: torch.Tensor) -> dict[str, EncoderOutput]:
    tokens = pooled[:, None, :]
    return {"image": EncoderOutput(tokens=tokens, pooled=pooled, grid=(1, 1, 1))}


def _ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_infonce_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    valid = torch.tensor([True, True])
    loss = infonce_loss(image, text, image, text, 0, valid, valid, torch.tensor(2.0))
    # image->text logits 2 * image @ text.T = [[2, 1.2], [0, 1.6]]; text->image = [[2, 0], [1.2, 1.6]].
    expected = (_ce([2, 1.2], 0) + _ce([0, 1.6], 1) + _ce([2, 0], 0) + _ce([1.2, 1.6], 1)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_infonce_masked_rows_equal_dropping_them():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    valid = torch.tensor([True, False, True, True])
    scale = torch.tensor(5.0)
    masked = infonce_loss(image, text, image, text, 0, valid, valid, scale)
    keep = valid.nonzero().squeeze(1)
    dropped = infonce_loss(
        image[keep], text[keep], image[keep], text[keep], 0, valid[keep], valid[keep], scale
    )
    assert masked.item() == pytest.approx(dropped.item(), rel=1e-6)
    none = torch.zeros(4, dtype=torch.bool)
    assert infonce_loss(image, text, image, text, 0, none, none, scale).item() == 0.0


def test_siglip_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    valid = torch.tensor([True, True])
    loss = siglip_loss(image, text, 0, valid, valid, torch.tensor(10.0), torch.tensor(-5.0))
    logits = [[10 * 1 - 5, 10 * 0.6 - 5], [10 * 0 - 5, 10 * 0.8 - 5]]

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = (
        -(
            log_sigmoid(logits[0][0])
            + log_sigmoid(-logits[0][1])
            + log_sigmoid(-logits[1][0])
            + log_sigmoid(logits[1][1])
        )
        / 2
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_kind", ["infonce", "siglip"])
def test_objective_matches_the_loss_on_its_embeddings(text_model, loss_kind):
    torch.manual_seed(0)
    objective = ClipObjective(8, text_model, proj_dim=4, max_length=32, loss=loss_kind).eval()
    pooled = torch.randn(4, 8)
    batch = {"report": REPORTS, "has_report": torch.tensor([True, True, False, True])}
    loss, metrics = objective(batch, _encoded(pooled))
    image = objective.clip.encode_image(pooled)
    text = objective.clip.encode_text(REPORTS)
    valid = batch["has_report"]
    if loss_kind == "infonce":
        expected = infonce_loss(image, text, image, text, 0, valid, valid, objective.clip.scale())
    else:
        expected = siglip_loss(
            image, text, 0, valid, valid, objective.clip.scale(), objective.clip.logit_bias
        )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(metrics) == {"i2t_recall_at_1", "temperature", "valid_fraction"}
    assert metrics["valid_fraction"].item() == pytest.approx(0.75)


def test_recall_metric_counts_valid_rows_only(text_model):
    # Mean pooling: a freshly initialised BERT gives every text the same [CLS] state (to float
    # precision), so with "cls" the reports would tie and R@1 would be a coin flip.
    torch.manual_seed(0)
    objective = ClipObjective(8, text_model, proj_dim=4, pooling="mean").eval()
    batch = {"report": REPORTS[:3], "has_report": torch.tensor([True, True, False])}
    with torch.no_grad():
        text = objective.clip.encode_text(REPORTS[:3])
        # Pooled inputs whose projections equal their own report's embedding: R@1 = 1.
        pooled = torch.linalg.lstsq(objective.clip.image_projection.weight, text.T).solution.T
        _, metrics = objective(batch, _encoded(pooled))
    assert metrics["i2t_recall_at_1"].item() == 1.0


def test_every_parameter_gets_a_gradient_without_any_report(text_model):
    objective = ClipObjective(8, text_model, proj_dim=4)
    pooled = torch.randn(3, 8, requires_grad=True)
    batch = {"report": ["", "", ""], "has_report": torch.zeros(3, dtype=torch.bool)}
    loss, _ = objective(batch, _encoded(pooled))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)
    assert pooled.grad is not None and not pooled.grad.any()


def test_validation_retrieval_over_the_epoch(text_model):
    objective = ClipObjective(8, text_model, proj_dim=4).eval()
    objective.reset_validation()
    for start in (0, 2):
        reports = REPORTS[start : start + 2]
        batch = {"report": reports, "has_report": torch.tensor([True, start == 0])}
        objective.update_validation(batch, _encoded(torch.randn(2, 8)))
    metrics = objective.compute_validation()
    assert {
        "i2t_recall_at_1",
        "i2t_recall_at_5",
        "i2t_recall_at_10",
        "t2i_recall_at_1",
        "i2t_mAP",
        "t2i_mAP",
    } <= set(metrics)
    assert metrics["i2t_recall_at_5"] == 1.0  # 3 valid studies: everything is in the top 5
    objective.reset_validation()
    assert objective.compute_validation() == {}


def test_missing_reports_are_a_clear_error(text_model):
    objective = ClipObjective(8, text_model, proj_dim=4)
    with pytest.raises(ObjectiveError, match="report"):
        objective({"has_report": torch.ones(2, dtype=torch.bool)}, _encoded(torch.randn(2, 8)))


def test_training_aligns_images_with_their_reports(text_model):
    torch.manual_seed(0)
    objective = ClipObjective(8, text_model, proj_dim=8, max_length=32).eval()  # eval: no text dropout
    pooled = torch.randn(4, 8)
    batch = {"report": REPORTS, "has_report": torch.ones(4, dtype=torch.bool)}
    # lr 5e-3: at 2e-2 the loss spiked now and then mid-run, and which step it spiked on
    # depended on the CPU thread count (float summation order), so the test flipped.
    optimizer = torch.optim.Adam(objective.parameters(), lr=5e-3)
    losses = []
    for _ in range(120):
        optimizer.zero_grad()
        loss, metrics = objective(batch, _encoded(pooled))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        _, metrics = objective(batch, _encoded(pooled))
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["i2t_recall_at_1"].item() == 1.0


@pytest.mark.parametrize("loss_kind", ["infonce", "siglip"])
def test_frozen_tower_on_cached_embeddings_equals_the_tower_run_on_the_texts(text_model, loss_kind):
    """Frozen mode reads `report_embedding` instead of running the tower: the same loss, no text weights."""
    torch.manual_seed(0)
    full = ClipObjective(
        embed_dim=8, text_model=text_model, proj_dim=4, pooling="mean", loss=loss_kind
    ).eval()
    frozen = ClipObjective(
        embed_dim=8, text_model=text_model, proj_dim=4, pooling="mean", loss=loss_kind, text_mode="frozen"
    )
    assert frozen.batch_keys == ("image", "report_embedding") and frozen.clip.text is None
    assert frozen.text_settings == full.clip.text.settings.to_dict() and full.text_settings is None
    frozen.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("clip.text.")})
    pooled = torch.randn(4, 8)
    cached = full.clip.text.embed(REPORTS)  # [4, 16]: what `fm3d text-cache build` stores
    has_report = torch.tensor([True, True, False, True])
    expected, _ = full({"report": REPORTS, "has_report": has_report}, _encoded(pooled))
    loss, _ = frozen({"report_embedding": cached, "has_report": has_report}, _encoded(pooled))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert frozen.clip.text_projection.weight.grad is not None
    assert sum(p.numel() for p in frozen.parameters()) < sum(p.numel() for p in full.parameters()) / 10
    with pytest.raises(ObjectiveError, match="report_embedding"):
        frozen({"report": REPORTS, "has_report": has_report}, _encoded(pooled))
