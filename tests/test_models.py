"""Models and losses of Zhang et al. (2016) and Dong et al. (2017): the behaviour the staged procedure relies on."""

import pytest
import torch
import torchvision

from trainables.losses import PAPER_VGG16_WEIGHTS, default_weights, euclidean, reconstruction_terms, total_loss
from trainables.models import (
    PAPER_VARIANTS,
    VARIANTS,
    create_model,
    fixed_switches,
    load_torchvision_state,
    set_trainable,
    unpool,
    vgg,
)

SMALL = dict(encoder="vgg_small", in_channels=1, image_size=28)


def small(variant, **kw):
    torch.manual_seed(0)
    return create_model({**SMALL, "variant": variant, **kw})


def test_swwae_unpooling_restores_maxima_at_argmax_on_odd_sizes():
    x = torch.randn(2, 3, 7, 7)
    pooled, idx = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    assert pooled.shape[-2:] == (3, 3)
    out = unpool(pooled, idx, x.shape[-2:])
    assert out.shape == x.shape
    flat_out, flat_x = out.flatten(2), x.flatten(2)
    picked = torch.gather(flat_out, 2, idx.flatten(2))
    assert torch.equal(picked, pooled.flatten(2))  # every maximum is back at its argmax...
    assert torch.equal(torch.gather(flat_x, 2, idx.flatten(2)), picked)  # ...which is where it came from
    mask = torch.zeros_like(flat_out, dtype=torch.bool).scatter_(2, idx.flatten(2), True)
    assert torch.count_nonzero(flat_out[~mask]) == 0  # zeros elsewhere


@pytest.mark.parametrize("offset", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_sae_unpooling_places_values_at_fixed_offset(offset):
    pooled = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 3, 3)
    out = unpool(pooled, fixed_switches(pooled, torch.Size((7, 7)), offset), torch.Size((7, 7)))
    assert out.shape == (1, 1, 7, 7)
    dy, dx = offset
    assert torch.equal(out[0, 0, dy:6:2, dx:6:2], pooled[0, 0])
    assert out.sum() == pooled.sum()  # nothing anywhere else


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_every_paper_model_has_the_levels_its_placement_names(variant):
    model = small(variant)
    out = model(torch.randn(4, 1, 28, 28))
    assert out.logits.shape == (4, 10)
    expected = {
        "baseline": set(),
        "first": {"image"},
        "all": {"image", "pool1", "pool2"},
        "layerwise": {"image", "pool1", "pool2"},
    }[variant.split("-")[-1]]
    assert set(out.recons) == expected == set(out.targets)
    for level, rec in out.recons.items():
        assert rec.shape == out.targets[level].shape, level
    # The loss has exactly those terms, each weighted as given.
    weights = {lvl: 10.0 ** -(i + 1) for i, lvl in enumerate(sorted(expected))}
    terms = reconstruction_terms(out.recons, out.targets)
    ce = torch.nn.functional.cross_entropy(out.logits, torch.zeros(4, dtype=torch.long))
    loss = total_loss(terms, weights, ce)
    manual = ce + sum(weights[l] * euclidean(out.recons[l], out.targets[l]) for l in expected)
    assert torch.allclose(loss, manual)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_swwae_decoder_reuses_encoder_switches_and_sae_does_not():
    x = torch.randn(2, 1, 28, 28)
    for variant, uses_switches in (("swwae-first", True), ("sae-first", False)):
        model = small(variant)
        torch.nn.init.ones_(model.pathway.blocks[0].convs[0].weight)  # make block 1 propagate its input
        feats = model.encoder.forward_features(x)
        h = feats.pooled[0]
        unpooled = unpool(h, model.pathway._switches(feats, 1, h), feats.sizes[0])
        nonzero = unpooled.flatten(2) != 0
        at_argmax = torch.zeros_like(nonzero).scatter_(2, feats.switches[0].flatten(2), True)
        assert bool((nonzero <= at_argmax).all()) == uses_switches


def test_decoder_init_and_linear_last_layer():
    model = small("swwae-all")
    convs = [m for m in model.pathway.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.001) < 0.0002 and all(torch.count_nonzero(c.bias) == 0 for c in convs)
    block1 = model.pathway.blocks[0].convs
    assert isinstance(block1[-1], torch.nn.Conv2d)  # image output is linear
    assert isinstance(model.pathway.blocks[1].convs[-1], torch.nn.ReLU)  # feature outputs are not
    # Mirrored channel counts: block k ends at the input channels of macro-layer k.
    assert [b.convs[0].in_channels for b in model.pathway.blocks] == [32, 64, 128]
    assert [[m.out_channels for m in b.convs if isinstance(m, torch.nn.Conv2d)] for b in model.pathway.blocks] == [
        [32, 1], [64, 32], [128, 64]
    ]


def test_torchvision_vgg16_state_dict_gives_identical_logits():
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None).eval()
    ours = load_torchvision_state(vgg("vgg16"), reference.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
        # Dense "convolution" evaluation equals the single crop at the training resolution.
        assert torch.allclose(ours.dense_logits(x), reference(x), atol=1e-4)


def test_pretrained_path_loads_a_local_pth(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    model = create_model({"variant": "swwae-all", "encoder": "vgg16", "in_channels": 3, "num_classes": 1000,
                          "image_size": 224, "pretrained": str(path)})
    assert torch.equal(model.encoder.features[0].weight, reference.features[0].weight)
    assert torch.equal(model.encoder.classifier[-1].weight, reference.classifier[-1].weight)


def test_wrong_state_dict_is_refused_with_the_keys_named():
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchvision_state(vgg("vgg16", num_classes=10), torchvision.models.vgg16(weights=None).state_dict())


def test_dense_logits_on_larger_images_average_a_score_map():
    model = vgg("vgg_small", in_channels=1, num_classes=10, image_size=28).eval()
    with torch.no_grad():
        assert model.dense_logits(torch.randn(2, 1, 44, 52)).shape == (2, 10)


def test_freezing_decoder_step_leaves_encoder_and_joint_step_changes_both():
    model = small("swwae-all")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def step(patterns, with_ce):
        set_trainable(model, patterns)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        out = model(x)
        terms = reconstruction_terms(out.recons, out.targets, form="mse")
        loss = total_loss(terms, {k: 1.0 for k in terms}, torch.nn.functional.cross_entropy(out.logits, y) if with_ce else None)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def snapshot(prefix):
        return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}

    enc0, dec0 = snapshot("encoder."), snapshot("pathway.")
    step(["decoder*"], with_ce=False)
    enc1, dec1 = snapshot("encoder."), snapshot("pathway.")
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert any(not torch.equal(dec0[k], dec1[k]) for k in dec0)
    step(["*"], with_ce=True)
    enc2, dec2 = snapshot("encoder."), snapshot("pathway.")
    assert any(not torch.equal(enc1[k], enc2[k]) for k in enc1 if "features" in k)
    assert any(not torch.equal(dec1[k], dec2[k]) for k in dec1)


def test_targets_get_gradients_unless_detached():
    model = small("swwae-all")
    x = torch.randn(2, 1, 28, 28)
    for detach in (False, True):
        model.zero_grad()
        out = model(x, head=False)
        # The prediction side is cut off, so any encoder gradient comes through the target.
        terms = reconstruction_terms({"pool1": out.recons["pool1"].detach()}, {"pool1": out.targets["pool1"]},
                                     detach_targets=detach)
        if detach:
            assert not terms["pool1"].requires_grad
        else:
            terms["pool1"].backward()
            assert torch.count_nonzero(model.encoder.features[0].weight.grad) > 0


def test_paper_default_weights():
    assert default_weights(["image", "pool1", "pool4", "pool7"]) == {"image": 1e-4, "pool1": 1e-12, "pool4": 1e-10, "pool7": 1e-12}
    assert PAPER_VGG16_WEIGHTS["pool3"] == 1e-12


def test_total_loss_refuses_a_level_without_weight():
    with pytest.raises(ValueError, match="pool1"):
        total_loss({"pool1": torch.tensor(1.0)}, {"image": 1.0})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"variant": "swwae-all", "encoder": "skipae"}, "max pooling"),
        ({"variant": "swae-all"}, "unknown model 'swae-all'"),
        ({"variant": "skipae", "encoder": "vgg_small"}, "needs encoder 'skipae'"),
        ({"variant": "baseline", "encoder": "vgg99"}, "unknown encoder"),
        ({"variant": "baseline", "colour": 3}, "unknown model config key"),
        ({"variant": "sae-all", "unpool_offset": [2, 0]}, "2x2 window"),
        ({"variant": "baseline", "pretrained": "IMAGENET1K_V1"}, "for encoder 'vgg16' only"),
        ({"variant": "baseline", "image_size": 4}, "too small"),
    ],
)
def test_impossible_combinations_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        create_model({**SMALL, **config})


def test_skip_autoencoder_denoises_better_after_training():
    torch.manual_seed(0)
    model = create_model({"variant": "skipae", "encoder": "skipae", "in_channels": 1, "image_size": 28,
                          "skip": {"depth": 4, "width": 8, "noise": "gaussian", "noise_level": 0.2}})
    # Structured images (blurred blobs) so that denoising is learnable.
    clean = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 28, 28), 5, 1, 2)
    clean = clean - clean.mean()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def error():
        with torch.no_grad():
            torch.manual_seed(123)
            out = model(clean, head=False, noisy=True)
            return torch.mean((out.recons["image"] - clean) ** 2).item()

    before = error()
    for _ in range(60):
        out = model(clean, head=False, noisy=True)
        loss = torch.mean((out.recons["image"] - out.targets["image"]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.5 * before


def test_all_variants_build_and_backprop():
    for variant in VARIANTS:
        enc = "skipae" if variant.startswith("skipae") else "vgg_tiny"
        model = create_model({**SMALL, "variant": variant, "encoder": enc})
        out = model(torch.randn(2, 1, 28, 28))
        loss = out.logits.sum() + sum(r.sum() for r in out.recons.values())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), variant
