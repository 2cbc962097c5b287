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


def test_dead_code_is_reseeded_from_current_encoder_outputs():
    quantizer = VectorQuantizer(4, 2, quantizer="ema", dead_code_threshold=0.5)
    quantizer.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    quantizer.embedding_sum.copy_(quantizer.embedding.data)
    quantizer.cluster_size.copy_(torch.tensor([5.0, 5.0, 5.0, 0.1]))  # code 3 has gone unused
    latents = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.1], [0.5, 0.5]]).t().reshape(1, 2, 1, 4)
    quantizer.train()(latents)
    reseeded = quantizer.embedding.detach()[3]
    assert (reseeded - torch.tensor([100.0, 100.0])).norm() > 50
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.cdist(reseeded[None], flat).min() < 0.5  # now sits on (near) a real encoder output


def test_fresh_codebook_is_seeded_from_data_at_the_first_step():
    quantizer = VectorQuantizer(16, 2, quantizer="ema", dead_code_threshold=1.0)
    latents = torch.randn(4, 2, 8, 8) * 5 + 20
    quantizer.train()(latents)
    assert quantizer.embedding.detach().mean() > 10  # the uniform(-1/K, 1/K) start was replaced by encoder outputs


def test_kmeans_initialisation_finds_clusters():
    quantizer = VectorQuantizer(2, 1, quantizer="ema")
    vectors = torch.cat([torch.full((50, 1), -3.0), torch.full((50, 1), 3.0)]) + 0.01 * torch.randn(100, 1)
    quantizer.kmeans_init(vectors)
    assert sorted(round(v) for v in quantizer.embedding.detach().flatten().tolist()) == [-3, 3]


def test_quantizer_computes_in_float32_under_mixed_precision():
    quantizer = VectorQuantizer(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, _, loss = quantizer(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert quantized.dtype == torch.float32 and loss.dtype == torch.float32


def test_config_round_trips_and_rejects_unknown_settings():
    config = VQVAEConfig(downsamples=3, quantizer="gradient")
    assert VQVAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model settings"):
        VQVAEConfig.from_dict({**config.to_dict(), "wings": 2})
