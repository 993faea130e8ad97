"""The pieces of the recipe (docs/model-and-recipe.md): optimiser groups, freezing, mixing loss, sampling, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crnn_art import CRNNArtClassifier
from crnn_art.config import AugmentConfig, DataConfig, resolve_config
from crnn_art.data.sampling import GlobalDrawBatchSampler, balanced_weights
from crnn_art.data.sources import make_splits
from crnn_art.training.loop import build_optimizer, stem_trainable
from crnn_art.training.loss import BatchMixer, one_hot_targets, soft_target_loss


def test_two_optimizer_groups_cover_every_parameter_once():
    cfg = resolve_config("style")
    model = CRNNArtClassifier(heads={"style": 27})
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == 1.5e-4 and groups["new"]["lr"] == 8e-4
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.trunk.parameters()}


def test_fused_adamw_makes_the_same_update():
    """train.fused_adamw only changes the kernel, not the step (two groups, weight decay included)."""
    cfg = resolve_config("style")
    torch.manual_seed(0)
    a = CRNNArtClassifier(heads={"style": 5})
    b = CRNNArtClassifier(heads={"style": 5})
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for model, fused in ((a, False), (b, True)):
        opt = build_optimizer(model, cfg, fused)
        assert bool(opt.defaults["fused"]) is fused
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(x).logits["style"].sum().backward()
        opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)


def test_compiled_trunk_computes_the_same_and_keeps_checkpoint_keys():
    """model.compile_trunk: torch.compile of the trunk in place changes speed, not the step or the weights' names."""
    import copy

    torch.manual_seed(0)
    model = CRNNArtClassifier(heads={"style": 4})
    keys = list(model.state_dict())
    model.trunk.compile()
    assert list(model.state_dict()) == keys
    CRNNArtClassifier(heads={"style": 4}).load_state_dict(model.state_dict())  # a compiled run's weights load eagerly

    # The compiled part in float64: a random-init ResNet-50 amplifies float32 rounding (fused vs unfused
    # kernels) to a few percent of its gradients, which would hide a real difference.
    eager = CRNNArtClassifier(heads={"style": 4}).trunk.double().to(memory_format=torch.channels_last).train()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    outputs = []
    for trunk in (eager, compiled):
        out = trunk(x)
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-9, rtol=1e-7)
    grads = [torch.cat([p.grad.flatten() for p in t.parameters() if p.grad is not None]) for t in (eager, compiled)]
    assert len(grads[0]) == len(grads[1]) > 0
    assert (grads[0] - grads[1]).norm() <= 1e-7 * grads[0].norm()


def test_unfreeze_schedule():
    style = resolve_config("style")
    assert [stem_trainable(style, e) for e in (1, 6, 7, 20)] == [False, False, True, True]
    genre = resolve_config("genre")
    assert not any(stem_trainable(genre, e) for e in range(1, 11))
    free = resolve_config("genre", None, ["train.freeze_stem=false"])
    assert stem_trainable(free, 1)


def test_soft_loss_equals_cross_entropy_without_mixing():
    torch.manual_seed(0)
    logits = {"style": torch.randn(6, 5)}
    labels = torch.tensor([[0], [1], [4], [2], [2], [3]])
    targets = one_hot_targets(labels, [5])
    loss, _ = soft_target_loss(logits, targets, {"style": 5}, smoothing=0.03)
    expected = F.cross_entropy(logits["style"], labels[:, 0], label_smoothing=0.03)
    torch.testing.assert_close(loss, expected)


def test_unknown_labels_only_skip_their_own_head():
    torch.manual_seed(0)
    logits = {"style": torch.randn(4, 3), "artist": torch.randn(4, 2)}
    labels = torch.tensor([[0, 1], [1, -1], [2, 0], [0, -1]])
    loss, per_head = soft_target_loss(logits, one_hot_targets(labels, [3, 2]), {"style": 3, "artist": 2}, 0.0)
    torch.testing.assert_close(per_head["style"], F.cross_entropy(logits["style"], labels[:, 0]))
    known = labels[:, 1] >= 0
    torch.testing.assert_close(per_head["artist"], F.cross_entropy(logits["artist"][known], labels[known, 1]))
    torch.testing.assert_close(loss, per_head["style"] + per_head["artist"])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_pairs_samples_and_keeps_label_mass(kind):
    aug = AugmentConfig(mixup_prob=1.0 if kind == "mixup" else 0.0, cutmix_prob=1.0 if kind == "cutmix" else 0.0)
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([[0, 1], [1, -1], [2, 0], [0, 1]])
    targets = one_hot_targets(labels, [3, 2])
    mixed, soft, got = BatchMixer(aug)(images, targets, seed=5)
    assert got == kind and mixed.shape == images.shape
    torch.testing.assert_close(soft[:, :3].sum(1), torch.ones(4))  # style always known
    assert (soft[:, 3:].sum(1) <= 1 + 1e-6).all()  # artist mass shrinks where a partner is unknown
    again = BatchMixer(aug)(images, targets, seed=5)
    torch.testing.assert_close(again[0], mixed)


def test_global_draw_is_shared_and_split_evenly():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(103, 1))
    weights = balanced_weights(labels)
    one = GlobalDrawBatchSampler(103, 8, 0, 1, seed=1, weights=weights)
    ranks = [GlobalDrawBatchSampler(103, 8, r, 2, seed=1, weights=weights) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(3)
    whole = [b for b in one]
    shares = [list(s) for s in ranks]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 103 // 8
    for k, batch in enumerate(whole):
        assert shares[0][k] + shares[1][k] == batch  # same slots, same augmentation seeds
    one.set_epoch(4)
    assert list(one) != whole
    one.set_epoch(3, start_batch=5)
    assert list(one) == whole[5:]


def test_balanced_draw_equalises_classes():
    labels = np.array([[0]] * 900 + [[1]] * 90 + [[2]] * 10)
    sampler = GlobalDrawBatchSampler(1000, 100, 0, 1, seed=0, weights=balanced_weights(labels))
    sampler.set_epoch(1)
    drawn = labels[sampler.global_draw().numpy(), 0]
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.all(np.abs(shares - 1 / 3) < 0.06)


def test_combined_weights_average_known_heads():
    labels = np.array([[0, 0], [0, -1], [1, 0], [1, 1]])
    w = balanced_weights(labels)
    np.testing.assert_allclose(w, [(1 / 2 + 1 / 2) / 2, 1 / 2, (1 / 2 + 1 / 2) / 2, (1 / 2 + 1) / 2])


def test_splits_are_deterministic_disjoint_and_order_free():
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.1, split_seed=3)
    a = make_splits(5000, cfg)
    b = make_splits(5000, cfg)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    all_rows = np.concatenate(list(a.values()))
    assert len(all_rows) == len(set(all_rows.tolist())) == 5000
    assert abs(len(a["validation"]) / 5000 - 0.2) < 0.03 and abs(len(a["test"]) / 5000 - 0.1) < 0.03
    # a longer source keeps every earlier row in the same split (a row's split depends on its id only)
    longer = make_splits(6000, cfg)
    np.testing.assert_array_equal(longer["validation"][longer["validation"] < 5000], a["validation"])
    other = make_splits(5000, DataConfig(val_fraction=0.2, test_fraction=0.1, split_seed=4))
    assert not np.array_equal(other["validation"], a["validation"])


def test_device_augmentation_is_the_same_recipe_split_in_two():
    """Workers crop and flip to uint8; the device normalises: together the worker-side recipe."""
    from PIL import Image

    from crnn_art.data.transforms import DeviceAugment, train_transform, worker_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    plain = AugmentConfig(color_jitter=[0.0, 0.0, 0.0, 0.0], erase_prob=0.0)
    torch.manual_seed(5)
    whole = train_transform(32, plain)(image)
    torch.manual_seed(5)
    crop = worker_transform(32, plain)(image)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
    torch.testing.assert_close(DeviceAugment(plain)(crop[None], seed=1)[0], whole, atol=1e-5, rtol=0)

    recipe = DeviceAugment(AugmentConfig(erase_prob=0.5))
    batch = torch.stack([crop] * 6)
    a, b = recipe(batch, seed=7), recipe(batch, seed=7)
    assert a.dtype == torch.float32 and torch.equal(a, b)  # seeded: a resumed run augments the same way
    assert not torch.equal(a[0], a[1])  # each sample gets its own jitter and erasing
    assert not torch.equal(recipe(batch, seed=8), a)


def test_bench_prints_every_figure_it_promises(tmp_path):
    import json

    from tests.conftest import run_cli

    out = run_cli(["bench", "--quick", "--json", "--image-size", "64", "--batch", "4", "--workers", "1"]).stdout
    report = json.loads(out[out.index("{"):])
    pipeline = report["pipeline"]
    for key in ("seed_images_per_s", "prepared_512_images_per_s", "worker_on_device_images_per_s",
                "loader_images_per_s"):
        assert pipeline[key] > 0
    assert pipeline["device_augment"]["images_per_s"] > 0
    assert report["optimizer"]["foreach_step_ms"] > 0 and report["optimizer"]["fused_step_ms"] > 0
    assert report["jpeg_decode"]["decode_jpeg_images_per_s"] > 0 and report["jpeg_decode"]["pil_draft_images_per_s"] > 0
    assert set(report["summary"]) >= {"crnn_vs_resnet50_step_time", "pipeline_speedup_vs_seed",
                                      "outlier_scoring_seconds"}
    assert set(report["meets_targets"]) == set(report["summary"]) & set(report["meets_targets"])
