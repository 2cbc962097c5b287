from __future__ import annotations

import pytest
import torch

from modules import VQVAE, VectorQuantizer, VQVAEConfig

SMALL = dict(hidden_channels=32, residual_channels=8, num_residual_layers=1, num_embeddings=16, embedding_dim=4)


@pytest.mark.parametrize("channels,downsamples,shape", [(1, 2, (64, 32)), (3, 2, (32, 32)), (1, 3, (64, 32))])
def test_vqvae_shapes_for_any_divisible_input(channels: int, downsamples: int, shape: tuple[int, int]):
    model = VQVAE(VQVAEConfig(in_channels=channels, downsamples=downsamples, **SMALL))
    images = torch.rand(2, channels, *shape)
    reconstruction, indices, loss = model(images)
    scale = 2**downsamples
    assert reconstruction.shape == images.shape
    assert indices.shape == (2, shape[0] // scale, shape[1] // scale) and indices.dtype == torch.long
    assert loss.ndim == 0
    assert model.decode_codes(indices).shape == images.shape
    assert model.encode(images).shape == (2, 4, shape[0] // scale, shape[1] // scale)


def test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    quantizer = VectorQuantizer(8, 3, quantizer="gradient", dead_code_threshold=0).eval()
    latents = torch.randn(2, 3, 4, 5, requires_grad=True)
    quantized, indices, loss = quantizer(latents)
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat, quantizer.embedding.detach()).argmin(1)
    assert torch.equal(indices.flatten(), expected)
    torch.testing.assert_close(quantized.detach(), quantizer.lookup(indices))
    quantized.sum().backward()
    torch.testing.assert_close(latents.grad, torch.ones_like(latents))  # identity gradient
    codebook_loss = torch.mean((quantizer.lookup(indices) - latents.detach()) ** 2)
    torch.testing.assert_close(loss, codebook_loss * 1.25)  # codebook + 0.25 * commitment (equal values)


def test_ema_update_moves_codes_toward_their_assigned_encoder_outputs():
    quantizer = VectorQuantizer(2, 2, quantizer="ema", ema_decay=0.5, dead_code_threshold=0)
    quantizer.embedding.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    quantizer.embedding_sum.copy_(quantizer.embedding.data)
    quantizer.cluster_size.fill_(1.0)
    targets = torch.tensor([[1.0, 1.0], [9.0, 9.0]])  # one vector near each code
    latents = targets.view(1, 2, 1, 2).permute(0, 3, 1, 2).reshape(1, 2, 1, 2)
    latents = targets.t().reshape(1, 2, 1, 2)
    before = quantizer.embedding.detach().clone()
    for _ in range(20):
        quantizer.train()(latents)
    after = quantizer.embedding.detach()
    assert ((after - targets).norm(dim=1) < (before - targets).norm(dim=1)).all()
    torch.testing.assert_close(after, targets, atol=1e-3, rtol=0)
    assert not quantizer.embedding.requires_grad  # EMA codebooks are not trained by the optimizer


def test_dead_code_is_reseeded_from_encoder_outputs_of_the_previous_step():
    quantizer = VectorQuantizer(4, 2, quantizer="ema", dead_code_threshold=0.5)
    quantizer.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    quantizer.cluster_size.copy_(torch.tensor([5.0, 5.0, 5.0, 0.5]))  # code 3: at the threshold
    quantizer.embedding_sum.copy_(quantizer.embedding.data * quantizer.cluster_size[:, None])
    previous = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.1], [0.5, 0.5]]).t().reshape(1, 2, 1, 4)
    quantizer.train()(previous)  # code 3 wins nothing: its use decays below the threshold
    torch.testing.assert_close(quantizer.embedding.detach()[3], torch.tensor([100.0, 100.0]), rtol=1e-3, atol=0)
    quantizer.train()(previous + 0.01)
    reseeded = quantizer.embedding.detach()[3]
    flat = previous.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.cdist(reseeded[None], flat).min() < 0.1  # now sits on an encoder output of the step before


def test_fresh_codebook_is_seeded_from_data_after_the_first_step():
    quantizer = VectorQuantizer(16, 2, quantizer="ema", dead_code_threshold=1.0)
    latents = torch.randn(4, 2, 8, 8) * 5 + 20
    quantizer.train()(latents)
    quantizer.train()(latents)
    assert quantizer.embedding.detach().mean() > 10  # the uniform(-1/K, 1/K) start was replaced by encoder outputs


def test_initialise_seeds_every_code_from_the_vectors_and_kmeans_finds_clusters():
    quantizer = VectorQuantizer(8, 2, quantizer="ema", dead_code_threshold=1.0)
    vectors = torch.randn(100, 2) + 50
    quantizer.initialise(vectors)
    assert (quantizer.embedding.detach()[:, None] == vectors[None]).all(dim=2).any(dim=1).all()  # each code is one
    assert (quantizer.cluster_size >= 1.0).all()  # restarts leave the seeded codes alone at first
    torch.testing.assert_close(quantizer.embedding_sum, quantizer.embedding.detach() * quantizer.cluster_size[:, None])
    two = VectorQuantizer(2, 1, quantizer="ema")
    clusters = torch.cat([torch.full((50, 1), -3.0), torch.full((50, 1), 3.0)]) + 0.01 * torch.randn(100, 1)
    two.initialise(clusters, kmeans_iterations=10)
    assert sorted(round(v) for v in two.embedding.detach().flatten().tolist()) == [-3, 3]


def test_ema_without_restarts_never_inflates_unused_codes():
    """With --dead-code-threshold 0 a code that wins nothing must keep a sensible vector (it once grew to 30 times
    the largest encoder output)."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 4, quantizer="ema", dead_code_threshold=0).train()
    largest = 0.0
    for _ in range(300):
        latents = torch.randn(8, 4, 4, 4) * 0.5 + 5  # far from the codebook's start: most codes never win
        largest = max(largest, latents.norm(dim=1).max().item())
        quantizer(latents)
    assert quantizer.embedding.detach().norm(dim=1).max() <= largest
    assert (quantizer.cluster_size == 0).any()  # some codes were indeed never used


def test_lookup_keeps_channels_last_and_old_checkpoints_load():
    quantizer = VectorQuantizer(8, 4)
    looked_up = quantizer.lookup(torch.randint(0, 8, (2, 3, 5)))
    assert looked_up.shape == (2, 4, 3, 5) and looked_up.is_contiguous(memory_format=torch.channels_last)
    state = quantizer.state_dict()
    del state["restart_candidates"]  # written before restart candidates were kept
    fresh = VectorQuantizer(8, 4)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.restart_candidates, state["embedding"])


def test_quantizer_computes_in_float32_under_mixed_precision():
    quantizer = VectorQuantizer(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, _, loss = quantizer(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert quantized.dtype == torch.float32 and loss.dtype == torch.float32


def test_config_round_trips_and_rejects_unknown_settings():
    config = VQVAEConfig(downsamples=3, quantizer="gradient")
    assert VQVAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown VQVAEConfig settings"):
        VQVAEConfig.from_dict({**config.to_dict(), "wings": 2})


def test_fingerprint_leaves_out_restart_candidates_so_old_priors_still_match():
    """Priors record their VQ-VAE's fingerprint; one made before restart candidates existed must still match."""
    import hashlib

    from modules import weights_fingerprint

    model = VQVAE(VQVAEConfig(**SMALL))
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if name != "quantizer.restart_candidates":  # the state of a model from before that buffer
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    assert weights_fingerprint(model) == digest.hexdigest()[:16]
    model.quantizer.restart_candidates.add_(1)
    assert weights_fingerprint(model) == digest.hexdigest()[:16]
    model.quantizer.embedding.data.add_(1)
    assert weights_fingerprint(model) != digest.hexdigest()[:16]


def test_cosine_codes_and_their_outputs_have_unit_norm():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, code_distance="cosine").train()
    for _ in range(4):
        quantized, _, _ = quantizer(torch.randn(2, 4, 5, 5) * 3 + 1)
    torch.testing.assert_close(quantizer.codebook().norm(dim=1), torch.ones(16))
    torch.testing.assert_close(quantizer.embedding.detach().norm(dim=1), torch.ones(16))  # the EMA stays on it
    torch.testing.assert_close(quantized.norm(dim=1), torch.ones(2, 5, 5))


def test_low_dimensional_lookup_round_trips_shapes():
    model = VQVAE(VQVAEConfig(**{**SMALL, "embedding_dim": 32}, lookup_dim=8))
    images = torch.rand(2, 1, 32, 16)
    reconstruction, indices, _ = model(images)
    assert model.quantizer.embedding.shape == (16, 8)  # the codebook lives in the low dimension
    assert reconstruction.shape == images.shape and indices.shape == (2, 8, 4)
    assert model.encode(images).shape == model.quantizer.lookup(indices).shape == (2, 32, 8, 4)
    assert model.decode_codes(indices).shape == images.shape


def test_rotation_trick_gradient_reaches_the_encoder_and_is_straight_through_when_code_equals_latent():
    from modules import rotate_onto

    torch.manual_seed(0)
    latents = torch.randn(6, 4, requires_grad=True)
    codes = torch.randn(6, 4)
    upstream = torch.randn(6, 4)
    rotated = rotate_onto(latents, codes)
    assert torch.equal(rotated.detach(), codes)  # forward: exactly the code
    (rotated * upstream).sum().backward()
    assert latents.grad.abs().sum() > 0 and not torch.allclose(latents.grad, upstream)
    # The map is a rotation times |code| / |latent|: gradient lengths scale by that ratio.
    ratio = codes.norm(dim=1) / latents.detach().norm(dim=1)
    torch.testing.assert_close(latents.grad.norm(dim=1), upstream.norm(dim=1) * ratio)
    same = latents.detach().clone().requires_grad_()
    (rotate_onto(same, same.detach().clone()) * upstream).sum().backward()
    torch.testing.assert_close(same.grad, upstream)  # code == latent: the identity, as straight-through
    quantizer = VectorQuantizer(8, 4, estimator="rotation", dead_code_threshold=0).train()
    inputs = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantizer(inputs)[0].sum().backward()
    assert inputs.grad.abs().sum() > 0


def test_configs_saved_before_an_option_existed_load_as_they_were_trained():
    old = {key: value for key, value in VQVAEConfig().to_dict().items() if key not in VQVAEConfig.LEGACY}
    config = VQVAEConfig.from_dict(old)
    assert (config.code_distance, config.lookup_dim, config.estimator) == ("euclidean", 0, "straight_through")
