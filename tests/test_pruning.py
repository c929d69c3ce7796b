"""Block-pruned UNets: BK-SDM configs and weight maps, LAPTOP-Diff scoring and selection, save/load, the swap."""

import pytest
import torch
from diffusers import UNet2DConditionModel

import accel
import pruning
from pruning.laptop import Candidate
from pruning.report import example_inputs
from tiny import run, tiny_unet


def _forward(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("variant", pruning.BK_SDM_VARIANTS)
def test_bk_sdm_students_have_the_expected_blocks_and_run(variant, sdxl):
    teacher = tiny_unet(sdxl=sdxl)
    student, key_map = pruning.bk_sdm_unet(teacher, variant)
    stages = 1 if variant == "tiny" else 2
    assert len(student.down_blocks) == len(student.up_blocks) == stages
    assert all(len(b.resnets) == 1 for b in student.down_blocks)
    assert all(len(b.resnets) == 2 for b in student.up_blocks)
    assert (student.mid_block is None) == (variant != "base")
    inputs = example_inputs(teacher, 2)
    assert _forward(student, inputs).shape == _forward(teacher, inputs).shape
    assert pruning.count_parameters(student) < pruning.count_parameters(teacher)
    # Every student tensor but tiny's first up layer (narrower input than the teacher's) is copied.
    uncopied = set(student.state_dict()) - set(key_map)
    assert all(k.startswith("up_blocks.0.resnets.0.") for k in uncopied) and (bool(uncopied) == (variant == "tiny"))


def test_bk_sdm_copies_the_teachers_weights_through_the_key_map():
    teacher = tiny_unet()
    student, key_map = pruning.bk_sdm_unet(teacher, "base")
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for s_key, t_key in key_map.items():
        assert torch.equal(student_state[s_key], teacher_state[t_key]), s_key
    # Up stages keep the first and the last layer: student layer 1 is the teacher's layer 2.
    assert key_map["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.0.resnets.2.conv1.weight"
    assert key_map["up_blocks.0.attentions.1.proj_in.weight"] == "up_blocks.0.attentions.2.proj_in.weight"


def test_bk_sdm_rejects_unknown_variants():
    with pytest.raises(ValueError, match="valid choices: 'base', 'small', 'tiny'"):
        pruning.bk_sdm_config(tiny_unet().config, "medium")


def test_laptop_ranks_a_harmless_block_last():
    unet = tiny_unet()
    harmless = unet.up_blocks[0].attentions[1]
    with torch.no_grad():  # a transformer layer whose residual branch outputs zero: removing it changes nothing
        harmless.proj_out.weight.zero_()
        harmless.proj_out.bias.zero_()
    calibration = [example_inputs(unet, 2, seed=s) for s in range(2)]
    scores = pruning.laptop_scores(unet, calibration)
    assert scores[-1][0].name == "up_blocks.0.attentions.1"
    assert scores[-1][1] < 1e-10 < scores[-2][1]
    kinds = {c.kind for c, _ in scores}
    assert kinds == {"resnet", "attention", "pair"}


def test_laptop_calibrates_an_sdxl_unet_and_ranks_a_harmless_block_last(sdxl_pipe):
    from accel.conditioning import encode_conditioning

    unet = sdxl_pipe.unet
    harmless = unet.down_blocks[1].attentions[0]
    with torch.no_grad():
        harmless.proj_out.weight.zero_()
        harmless.proj_out.bias.zero_()
    conditioning = encode_conditioning(sdxl_pipe, ["a photo of a horse", "a ship"], unconditional=False)
    calibration = pruning.calibration_inputs(unet, conditioning, sdxl_pipe.scheduler.config, num_timesteps=1)
    assert calibration[0]["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    scores = pruning.laptop_scores(unet, calibration)
    assert scores[-1][0].name == "down_blocks.1.attentions.0"
    assert scores[-1][1] < 1e-10 < scores[-2][1]
    with pytest.raises(ValueError, match="needs pooled text embeds and time ids"):
        pruning.calibration_inputs(unet, conditioning.encoder_hidden_states, sdxl_pipe.scheduler.config)
    with pytest.raises(ValueError, match="every calibration input needs added_cond_kwargs"):
        pruning.laptop_scores(unet, [{k: v for k, v in calibration[0].items() if k != "added_cond_kwargs"}])


def test_select_blocks_solves_the_knapsack_one_option_per_layer():
    def cand(name, layer):
        return Candidate(name, "attention", layer, (name,))

    a, b, c, pair = cand("a", "l0"), cand("b", "l1"), cand("c", "l2"), cand("a+x", "l0")
    scores = [(a, 1.0), (b, 1.5), (c, 1.6), (pair, 5.0)]
    costs = {"a": 3, "b": 5, "c": 5, "a+x": 20}
    # Greedy by score would take a then b (saving 8 < 10): the cheapest set reaching 10 is b + c.
    chosen = pruning.select_blocks(scores, costs, 10)
    assert sorted(x.name for x in chosen) == ["b", "c"]
    assert [x.name for x in pruning.select_blocks(scores, costs, 21)] == ["a+x", "b"] or \
        sorted(x.name for x in pruning.select_blocks(scores, costs, 21)) == ["a+x", "b"]
    with pytest.raises(ValueError, match="at most 30"):
        pruning.select_blocks(scores, costs, 31)


def test_laptop_student_reaches_the_ratio_and_round_trips(tmp_path):
    teacher = tiny_unet()
    calibration = [example_inputs(teacher, 2, seed=0)]
    student, info = pruning.laptop_unet(teacher, calibration, 0.3, target="params")
    assert isinstance(student, pruning.PrunedUNet2DConditionModel)
    assert pruning.count_parameters(student) <= 0.7 * pruning.count_parameters(teacher)
    assert info["saved"] >= 0.3 and info["removed_blocks"]
    teacher_state = teacher.state_dict()
    assert all(torch.equal(v, teacher_state[k]) for k, v in student.state_dict().items())
    with pruning.blocks_removed(teacher, info["removed_blocks"]):
        inputs = example_inputs(teacher, 1)
        assert torch.allclose(_forward(teacher, inputs), _forward(student, inputs), atol=1e-6)
    pruning.save_unet(student, tmp_path / "laptop")
    loaded = pruning.load_unet(tmp_path / "laptop")
    assert type(loaded) is pruning.PrunedUNet2DConditionModel
    assert loaded.config.removed_blocks == info["removed_blocks"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in student.state_dict().items())
    assert torch.allclose(_forward(loaded, inputs), _forward(student, inputs), atol=1e-5)


def test_bk_student_saves_as_a_plain_diffusers_unet(tmp_path):
    student, _ = pruning.bk_sdm_unet(tiny_unet(sdxl=True), "small")
    report = pruning.pruning_report(tiny_unet(sdxl=True), student, method="bk-small", latency=False)
    assert report["params_ratio"] < 1 and report["macs_ratio"] < 1
    pruning.save_unet(student, tmp_path / "small", report)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "small")
    assert loaded.config.mid_block_type is None and (tmp_path / "small" / "pruning_report.md").is_file()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in student.state_dict().items())


def test_unet_swap_three_passes_and_composes_with_deepcache(sd_pipe, tmp_path):
    student, _ = pruning.bk_sdm_unet(sd_pipe.unet, "small")
    pruning.save_unet(student, tmp_path / "small")
    original = sd_pipe.unet
    baseline = run(sd_pipe)
    accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.UNetSwapConfig(path=str(tmp_path / "small"))))
    assert sd_pipe.unet is not original and sd_pipe.unet.mid_block is None
    swapped = run(sd_pipe)
    assert swapped.shape == baseline.shape and not (swapped == baseline).all()
    accel.restore(sd_pipe)
    assert sd_pipe.unet is original and (run(sd_pipe) == baseline).all()
    # DeepCache reads the student's layout: without a mid block the deepest branch is one shallower.
    config = accel.AccelConfig(model=accel.UNetSwapConfig(unet=student), cache=accel.DeepCacheConfig(cache_interval=2))
    accel.accelerate(sd_pipe, config)
    assert run(sd_pipe, steps=3).shape == baseline.shape
    accel.restore(sd_pipe)
    with pytest.raises(ValueError, match="no mid block"):
        bad = accel.AccelConfig(model=accel.UNetSwapConfig(unet=student), cache=accel.DeepCacheConfig(cache_branch=3))
        accel.accelerate(sd_pipe, bad)
    assert sd_pipe.unet is original and (run(sd_pipe) == baseline).all()


def test_unet_swap_errors_say_what_is_wrong(sd_pipe, tmp_path):
    with pytest.raises(ValueError, match="not a saved UNet folder"):
        accel.UNetSwapConfig(path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exactly one of"):
        accel.UNetSwapConfig()
    with pytest.raises(ValueError, match="must be a UNet2DConditionModel"):
        accel.UNetSwapConfig(unet=torch.nn.Linear(2, 2))
    other = tiny_unet(sdxl=True)  # cross-attention 64 and text-time conditioning: not this pipeline's
    original = sd_pipe.unet
    with pytest.raises(ValueError, match="cross_attention_dim: student 64, pipeline 32"):
        accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.UNetSwapConfig(unet=other)))
    assert sd_pipe.unet is original and not accel.is_accelerated(sd_pipe)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="not a UNet"):
        accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.UNetSwapConfig(path=str(tmp_path / "vae"))))


def test_unet_swap_reads_a_laptop_student_with_prunings_loader(sd_pipe, tmp_path):
    student, _ = pruning.laptop_unet(sd_pipe.unet, [example_inputs(sd_pipe.unet, 2, seed=0)], 0.3)
    pruning.save_unet(student, tmp_path / "laptop")
    original, baseline = sd_pipe.unet, run(sd_pipe)
    with pytest.raises(ValueError, match="holds a PrunedUNet2DConditionModel, not a UNet"):
        accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.UNetSwapConfig(path=str(tmp_path / "laptop"))))
    config = accel.UNetSwapConfig(path=str(tmp_path / "laptop"), loader=pruning.load_unet)
    accel.accelerate(sd_pipe, accel.AccelConfig(model=config))
    assert type(sd_pipe.unet) is pruning.PrunedUNet2DConditionModel
    accel.restore(sd_pipe)
    assert sd_pipe.unet is original and (run(sd_pipe) == baseline).all()
    with pytest.raises(ValueError, match="given with path"):
        accel.UNetSwapConfig(unet=student, loader=pruning.load_unet)


def test_laptop_scoring_shows_its_progress(capsys):
    teacher = tiny_unet()
    n = len(pruning.removable_candidates(teacher))
    pruning.laptop_scores(teacher, [example_inputs(teacher, 1, seed=0)], disable=False)
    assert f"LAPTOP: scoring blocks:   0%|          | 0/{n} [" in capsys.readouterr().err


def test_teacher_and_student_latencies_are_timed_in_turn():
    """One pass each per round: a slow spell of the host cannot fall on the teacher's runs alone."""
    from pruning.report import measure_latencies

    calls = []

    class Fake:
        device = torch.device("cpu")

        def __init__(self, name):
            self.name = name

        def __call__(self, **inputs):
            calls.append(self.name)

    assert len(measure_latencies([Fake("teacher"), Fake("student")], {}, warmup=1, repeats=3)) == 2
    assert calls == ["teacher", "student"] * 4
