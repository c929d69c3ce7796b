"""Knowledge-distillation retraining of pruned students, and the shared training data code."""

import numpy as np
import pytest
import torch

import pruning
from distill.data import CaptionedImages, LatentSet, image_caption_folder, sample_latent_batch
from distill.kd import KDConfig, NoiseSchedule, distill_unet, kd_loss, stage_pairs
from tiny import tiny_unet

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _batch(unet, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 16, 16, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    schedule = NoiseSchedule(SCHEDULE, "cpu")
    noisy, target = schedule.noisy_and_target(x0, noise, timesteps)
    return noisy, timesteps, torch.randn(n, 7, 32, generator=g), target, schedule.loss_weights(timesteps, 5.0)


def _kd_steps(student, teacher, pairs, args, steps: int) -> list[float]:
    """Adam steps on `kd_loss(student, teacher, pairs, *args)` over one fixed batch; the loss of each step.
    Every step has both KD terms."""
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss, parts = kd_loss(student, teacher, pairs, *args)
        assert parts["feature_kd"] > 0 and parts["output_kd"] > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_kd_steps_lower_the_loss_on_a_fixed_batch():
    teacher = tiny_unet()
    student, _ = pruning.bk_sdm_unet(teacher, "small")
    student.train()
    pairs = stage_pairs(student, teacher)
    assert [n for n, _, _ in pairs] == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"]
    losses = _kd_steps(student, teacher, pairs, (*_batch(teacher), KDConfig()), steps=4)
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_terms_are_normalised_per_stage():
    teacher = tiny_unet()
    student, _ = pruning.bk_sdm_unet(teacher, "base")
    pairs = stage_pairs(student, teacher)
    batch = _batch(teacher)
    feature_only = KDConfig(task_weight=0.0, output_weight=0.0)
    loss, parts = kd_loss(student, teacher, pairs, *batch, feature_only)
    # Scaling the teacher's features by 100 scales the raw errors by ~1e4; the normalised terms stay O(1).
    hooks = [t.register_forward_hook(lambda m, a, o: (o[0] * 100,) + tuple(o[1:]) if isinstance(o, tuple) else o * 100)
             for _, _, t in pairs]
    try:
        scaled, _ = kd_loss(student, teacher, pairs, *batch, feature_only)
    finally:
        for h in hooks:
            h.remove()
    assert 0 < loss.item() < 10 * len(pairs) and scaled.item() < 2 * len(pairs)
    # A student identical to its teacher has no KD loss at all.
    same, parts = kd_loss(teacher, teacher, stage_pairs(teacher, teacher), *batch, KDConfig(task_weight=0.0))
    assert same.item() == 0.0


def test_tiny_student_pairs_stages_from_the_output_end():
    teacher = tiny_unet()
    student, _ = pruning.bk_sdm_unet(teacher, "tiny")
    names = [(n, t) for n, _, t in stage_pairs(student, teacher)]
    assert names == [("down_blocks.0", teacher.down_blocks[0]), ("up_blocks.0", teacher.up_blocks[1])]


def test_distill_unet_trains_checkpoints_and_resumes(tmp_path):
    teacher = tiny_unet()
    g = torch.Generator().manual_seed(0)
    latents = LatentSet(torch.randn(8, 4, 16, 16, generator=g), torch.full((8, 4, 16, 16), 0.1),
                        torch.randint(0, 3, (8, 2), generator=g), ("a", "b", "c"))
    captions = torch.randn(4, 7, 32, generator=g)
    config = KDConfig(max_steps=2, batch_size=2, checkpoint_every=1, gradient_checkpointing=True)
    student, _ = pruning.bk_sdm_unet(teacher, "small")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill_unet(teacher, student, latents, captions, SCHEDULE, config, tmp_path, progress=False)
    assert result["steps"] == 2 and (tmp_path / "checkpoint" / "model.safetensors").is_file()
    assert any(not torch.equal(before[k], v) for k, v in result["student"].state_dict().items())
    longer = KDConfig(max_steps=3, batch_size=2, checkpoint_every=10)
    again, _ = pruning.bk_sdm_unet(teacher, "small")
    resumed = distill_unet(teacher, again, latents, captions, SCHEDULE, longer, tmp_path, progress=False)
    assert resumed["steps"] == 3 and len(resumed["loss_history"]) == 0  # one step run after resuming at 2


def _sdxl_kd_setup(tmp_path):
    from accel.conditioning import encode_conditioning
    from tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path)
    conditioning = encode_conditioning(pipe, ["a red car", "a black cat"], resolution=32)
    student, _ = pruning.bk_sdm_unet(pipe.unet, "small")
    return pipe, conditioning, student


def test_kd_steps_on_an_sdxl_teacher_and_bk_small_student_lower_the_loss(tmp_path):
    pipe, conditioning, student = _sdxl_kd_setup(tmp_path)
    teacher = pipe.unet
    assert conditioning.text_embeds.shape == (3, 32) and conditioning.time_ids[0].tolist() == [32, 32, 0, 0, 32, 32]
    assert conditioning.encoder_hidden_states[-1].abs().max() == 0  # SDXL's unconditional embedding: zeros
    student.train()
    pairs = stage_pairs(student, teacher)
    noisy, timesteps, _, target, weights = _batch(teacher, n=3)
    cond = conditioning[torch.tensor([0, 1, 2])]
    args = (noisy, timesteps, cond.encoder_hidden_states, target, weights, KDConfig())
    # the pooled text embeds and time ids reach both UNets: other time ids, other loss
    other = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids * 4}
    with torch.no_grad():
        assert kd_loss(student, teacher, pairs, *args, other)[0] != kd_loss(student, teacher, pairs, *args, cond.added_cond_kwargs)[0]
    losses = _kd_steps(student, teacher, pairs, (*args, cond.added_cond_kwargs), steps=3)
    assert losses[-1] < 0.9 * losses[0]


def test_distill_unet_trains_an_sdxl_student_and_needs_its_added_conditions(tmp_path):
    pipe, conditioning, student = _sdxl_kd_setup(tmp_path)
    g = torch.Generator().manual_seed(0)
    latents = LatentSet(torch.randn(4, 4, 16, 16, generator=g), torch.full((4, 4, 16, 16), 0.1),
                        torch.randint(0, 2, (4, 1), generator=g), ("a red car", "a black cat"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = KDConfig(max_steps=1, batch_size=2, ema_decay=0.0)
    with pytest.raises(ValueError, match="needs pooled text embeds and time ids"):
        distill_unet(pipe.unet, student, latents, conditioning.encoder_hidden_states, SCHEDULE, config, tmp_path / "a")
    result = distill_unet(pipe.unet, student, latents, conditioning, SCHEDULE, config, tmp_path / "b", progress=False)
    assert result["steps"] == 1 and result["loss_history"][0]["feature_kd"] > 0
    assert any(not torch.equal(before[k], v) for k, v in result["student"].state_dict().items())
    with pytest.raises(ValueError, match="take different conditioning"):
        distill_unet(pipe.unet, tiny_unet(), latents, conditioning, SCHEDULE, config, tmp_path / "c")


def test_kd_config_validates():
    with pytest.raises(ValueError, match="valid choices: 'no', 'bf16', 'fp16'"):
        KDConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="feature_weight"):
        KDConfig(feature_weight=-1)


def test_image_caption_folder_and_batches(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red car\na car\n")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("a black square")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "no_caption.png")
    data = image_caption_folder(tmp_path, 16)
    assert data.images.shape == (2, 3, 16, 16) and data.captions == ("a red car", "a car", "a black square")
    assert data.choices.tolist() == [[0, 1], [2, 2]] and data[1]["caption"] == "a black square"
    assert data[0]["pixel_values"].max() <= 1.0
    latents = LatentSet(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), data.choices, data.captions)
    _, caption = sample_latent_batch(latents, 64, torch.Generator().manual_seed(0), cfg_dropout=0.5)
    assert set(caption.tolist()) <= {0, 1, 2, 3} and 3 in caption.tolist()
    with pytest.raises(ValueError, match="no images with a same-stem .txt caption"):
        image_caption_folder(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path, 16)
    with pytest.raises(ValueError, match="uint8"):
        CaptionedImages(torch.zeros(1, 3, 4, 4), ("a",), torch.zeros(1, 1, dtype=torch.long))
