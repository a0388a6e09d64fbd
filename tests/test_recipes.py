"""The papers' runs as recipes: every recipe parses and builds the model its table names, and what it resolves to
(phases, optimizer, masks, noise schedule, EMA, sampler) equals the paper's tables, typed in here from
shared/papers (MaskDiT section 4.1; MaskDM Tables 5-9), not read back from the recipe files."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_masked import MaskedDiTTransformer2DModel, MaskedUViTTransformer2DModel
from diffusers_masked.training.recipes import RECIPES, get_recipe
from tests.launch import launch
from tests.test_scripts import REPO, _script
from tests.tiny import tiny_vae

ALL = [(script, name) for script, recipes in RECIPES.items() for name in recipes]


def _parse(script, name, *extra):
    recipe = get_recipe(script, name)
    argv = ["--recipe", name, *extra]
    if "data" in recipe.requires:
        argv += ["--train_data_dir", str(REPO)]  # any folder that exists: parsing reads nothing from it
    if "pretrained_model_name_or_path" in recipe.requires:
        argv += ["--pretrained_model_name_or_path", str(REPO)]
    if "vae" in recipe.requires:
        argv += ["--vae", str(REPO)]
    if "text_encoder_name_or_path" in recipe.requires:
        argv += ["--text_encoder_name_or_path", str(REPO)]
    return _script(script).parse_args(argv)


def _phases(args, stage):
    module = _script("train_maskdm")
    steps = args.max_train_steps if stage == "pretrain" else args.finetune_steps
    return module.stage_phases(args, stage) if steps else []


@pytest.mark.parametrize("script, name", ALL)
def test_every_recipe_parses_and_is_recorded_by_name_and_version(script, name):
    args = _parse(script, name, "--seed", "7")
    assert args.recipe == f"{name}@v{get_recipe(script, name).version}" and args.seed == 7


def test_a_flag_given_on_the_command_line_overrides_the_recipe():
    args = _parse("train_maskdit", "imagenet256-xl2", "--learning_rate", "3e-4", "--train_data_dir", "/mine")
    assert args.learning_rate == 3e-4 and args.mask_ratio == 0.5
    assert args.dataset_name is None and args.train_data_dir == "/mine"  # a data source replaces the recipe's


def test_an_unknown_recipe_or_a_missing_requirement_is_refused_naming_what_to_give(capsys):
    with pytest.raises(SystemExit):
        _script("train_maskdm").parse_args(["--recipe", "celeba32"])
    assert "has no recipe 'celeba32'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script("train_maskdm").parse_args(["--recipe", "ffhq64", "--train_data_dir", "/d"])
    assert "needs --pretrained_model_name_or_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script("train_maskdm").parse_args(["--recipe", "celebahq256"])
    assert "needs --dataset_name or --train_data_dir" in capsys.readouterr().err


def test_dit_recipes_are_dits_and_treads_tables(capsys):
    # DiT (Peebles & Xie 2023) section 5 and Table 4; TREAD (Krause et al. 2025) Table 2 and its route rule.
    for name, layers, routed in [
        ("imagenet256-dit-b2", 12, None),
        ("imagenet256-tread-b2", 12, (2, 8)),
        ("imagenet256-dit-xl2", 28, None),
        ("imagenet256-tread-xl2", 28, (2, 24)),
    ]:
        args = _parse("train_dit", name)
        assert (args.learning_rate, args.adam_weight_decay, args.ema_decay) == (1e-4, 0.0, 0.9999)
        assert (args.train_batch_size * 8, args.max_train_steps, args.class_dropout_prob) == (256, 400_000, 0.1)
        assert args.random_flip and args.resolution == 256 and args.vae == "stabilityai/sd-vae-ft-mse"
        assert args.model_config_resolved["num_layers"] == layers
        if routed is None:
            assert args.tread_routes is None
        else:
            from diffusers_masked.routing import Route, resolve_routes

            assert resolve_routes(args.tread_routes, layers) == (Route(0.5, *routed),)
    with pytest.raises(SystemExit):
        _script("train_dit").parse_args([])
    assert "needs --dataset_name or --train_data_dir" in capsys.readouterr().err


def test_recipe_list_prints_every_name_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script("train_maskdm").parse_args(["--recipe", "list"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name in RECIPES["train_maskdm"]:
        assert f"  {name}@v{2 if name == 'digits' else 1} " in out  # the digits default was retuned once


def _meta_parameters(model_cls, config):
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(**config).parameters())


@pytest.mark.parametrize("name", [n for n in RECIPES["train_maskdm"] if n not in ("digits",)])
def test_every_maskdm_recipe_builds_table_5s_model(name):
    # Table 5: MaskDM-S 44M (64 px), MaskDM-B 102M (256 px), both patch 4, widths 512 / 768, 8 / 12 heads.
    args = _parse("train_maskdm", name)
    config = MaskedUViTTransformer2DModel.preset_config(args.model_config)  # fine-tuning recipes start from weights
    size, expected = {"MaskDM-S": (64, 44), "MaskDM-B": (256, 102)}[args.model_config]
    config.update(sample_size=size, in_channels=3, num_classes=0)
    assert config["patch_size"] == 4
    assert config["num_attention_heads"] * config["attention_head_dim"] == {44: 512, 102: 768}[expected]
    assert round(_meta_parameters(MaskedUViTTransformer2DModel, config) / 1e6) == expected


def test_maskdm_b_is_13_blocks_the_count_that_gives_table_5s_parameters():
    # "depth 12" with 12 blocks gives 95.3M (6 in + 6 out) or 88.2M (no skips); 13 blocks give 102.4M.
    base = {"sample_size": 256, "patch_size": 4, "in_channels": 3, "num_attention_heads": 12, "attention_head_dim": 64}
    assert _meta_parameters(MaskedUViTTransformer2DModel, {**base, "num_layers": 13}) == 102_417_456
    assert round(_meta_parameters(MaskedUViTTransformer2DModel, {**base, "num_layers": 11}) / 1e6) != 102


# MaskDM's Tables 6-9, typed in: per recipe, pre-training stages (steps, mask rate, total batch, lr, warm-up,
# clip), the fine-tuning (steps, lr, total batch, EMA, warm-up, clip), the mask (type, block), noise schedule,
# flip, sampler and its steps. Batches are totals; the recipes split them over 2 processes.
MASKDM = {
    "celeba64-mask10": ([(50_000, 0.1, 128, 1e-4, 0, None)], (200_000, 1e-4, 128, 0.999, 0, None), ("block", 2),
                        "linear", False, ("ddim", 500)),
    "celeba64-mask50": ([(50_000, 0.5, 256, 2e-4, 0, None)], (200_000, 1e-4, 128, 0.999, 0, None), ("block", 2),
                        "linear", False, ("ddim", 500)),
    "celeba64-mask90": ([(50_000, 0.9, 512, 2e-4, 0, None)], (200_000, 1e-4, 128, 0.999, 0, None), ("block", 2),
                        "linear", False, ("ddim", 500)),
    "celeba64": ([(150_000, 0.5, 256, 2e-4, 5000, None)], (350_000, 2e-4, 128, 0.9999, 5000, None), ("block", 2),
                 "linear", True, ("ddpm", 1000)),
    "celeba128": ([(50_000, 0.7, 256, 2e-4, 5000, 1.0), (350_000, 0.5, 128, 1e-4, 5000, 1.0)],
                  (100_000, 5e-5, 64, 0.999, 5000, 1.0), ("block", 4), "squaredcos_cap_v2", False, ("ddim", 500)),
    "celebahq256": ([(200_000, 0.9, 128, 2e-4, 0, None), (500_000, 0.5, 64, 2e-4, 5000, 1.0)],
                    (100_000, 1e-5, 32, 0.999, 5000, 1.0), ("block", 4), "squaredcos_cap_v2", False, ("ddim", 500)),
    "celeba64-fig4": ([(50_000, 0.5, 256, 2e-4, 0, None)], (200_000, 1e-4, 128, 0.9999, 0, None), ("block", 2),
                      "linear", False, ("ddim", 250)),
    "ffhq64": ([], (200_000, 1e-4, 128, 0.999, 0, None), ("block", 2), "linear", False, ("ddim", 500)),
    "afhq64": ([], (200_000, 1e-4, 128, 0.999, 0, None), ("block", 2), "linear", False, ("ddim", 500)),
    "celeba64-vpcosine": ([(50_000, 0.5, 256, 2e-4, 0, None)], (200_000, 1e-4, 128, 0.999, 0, None),
                          ("block", 2), "linear", True, ("dpmsolver", 50)),
    "celebahq256-10pct": ([(200_000, 0.5, 64, 2e-4, 0, None)], (50_000, 5e-4, 64, 0.999, 0, None), ("block", 4),
                          "squaredcos_cap_v2", True, ("ddim", 250)),
    "celebahq256-1pct": ([(200_000, 0.5, 64, 2e-4, 0, None)], (50_000, 5e-4, 64, 0.999, 0, None), ("block", 4),
                         "squaredcos_cap_v2", True, ("ddim", 250)),
    "vggface2-256": ([(200_000, 0.9, 256, 2e-4, 0, None)], None, ("block", 4), "squaredcos_cap_v2", False,
                     ("ddim", 250)),
    "celebahq256-10pct-from-vggface2": ([], (50_000, 5e-4, 64, 0.999, 0, None), ("block", 4), "squaredcos_cap_v2",
                                        True, ("ddim", 250)),
    # The captions' baselines: the fine-tuning settings for 250k / 550k / 800k / 250k / 200k steps.
    "celeba64-scratch": ([], (250_000, 1e-4, 128, 0.999, 0, None), ("block", 2), "linear", False, ("ddim", 500)),
    "celeba128-scratch": ([], (550_000, 5e-5, 64, 0.999, 5000, 1.0), ("block", 4), "squaredcos_cap_v2", False,
                          ("ddim", 500)),
    "celebahq256-scratch": ([], (800_000, 1e-5, 32, 0.999, 5000, 1.0), ("block", 4), "squaredcos_cap_v2", False,
                            ("ddim", 500)),
    "ffhq64-scratch": ([], (250_000, 1e-4, 128, 0.999, 0, None), ("block", 2), "linear", False, ("ddim", 500)),
    "celebahq256-10pct-scratch": ([], (200_000, 5e-4, 64, 0.999, 0, None), ("block", 4), "squaredcos_cap_v2", True,
                                  ("ddim", 250)),
}  # fmt: skip


def test_every_paper_recipe_of_maskdm_is_in_the_table_above():
    assert set(RECIPES["train_maskdm"]) - {"digits", "default"} == set(MASKDM)


@pytest.mark.parametrize("name", sorted(MASKDM))
def test_maskdm_recipes_resolve_to_the_papers_tables(name):
    pretrain, finetune, mask, schedule, flip, sampling = MASKDM[name]
    args = _parse("train_maskdm", name)
    phases = [(p.end - p.start, p.ratio(p.start), 2 * p.batch_size, p.learning_rate, p.warmup_steps, p.max_grad_norm)
              for p in _phases(args, "pretrain")]  # fmt: skip
    assert phases == pretrain
    if finetune is None:
        assert args.finetune_steps == 0
    else:
        (tune,) = _phases(args, "finetune")
        got = (
            tune.end,
            tune.learning_rate,
            2 * tune.batch_size,
            args.ema_decay,
            tune.warmup_steps,
            tune.max_grad_norm,
        )
        assert got == finetune and tune.ratio(0) == 0.0
    assert (args.mask_type, args.mask_block_size) == mask
    assert args.beta_schedule == schedule and args.random_flip == flip
    assert (args.sampler, args.num_inference_steps) == sampling
    # Shared by every column (M:110): AdamW (0.99, 0.99), mixed precision, no EMA warm-up.
    assert (args.adam_beta1, args.adam_beta2, args.mixed_precision, args.ema_warmup) == (0.99, 0.99, "bf16", False)


def test_the_transfer_recipes_train_on_the_first_10_or_1_percent_of_celeba_hq():
    assert _parse("train_maskdm", "celebahq256-10pct").max_train_samples == 3000
    assert _parse("train_maskdm", "celebahq256-1pct").max_train_samples == 300
    assert _parse("train_maskdm", "celebahq256-10pct-from-vggface2").max_train_samples == 3000
    vpcosine = _parse("train_maskdm", "celeba64-vpcosine")
    assert (vpcosine.beta_schedule, vpcosine.finetune_beta_schedule) == ("linear", "squaredcos_cap_v2")


def test_maskdit_imagenet256_is_the_papers_main_run():
    # MaskDiT section 4.1 and appendix A.
    args = _parse("train_maskdit", "imagenet256-xl2")
    assert (args.dataset_name, args.vae, args.resolution) == ("ILSVRC/imagenet-1k", "stabilityai/sd-vae-ft-mse", 256)
    assert (args.mask_type, args.mask_ratio, args.mae_loss_weight, args.class_dropout_prob) == ("patch", 0.5, 0.1, 0.1)
    assert 8 * args.train_batch_size == 1024 and args.max_train_steps == 2_000_000
    assert (args.learning_rate, args.lr_warmup_steps, args.adam_weight_decay) == (1e-4, 0, 0.0)
    assert (args.ema_decay, args.ema_warmup, args.random_flip) == (0.9999, False, False)
    assert args.mixed_precision in ("bf16", "fp16") and args.unmask_tuning_steps == 0
    assert (args.num_inference_steps, args.guidance_scale) == (40, 1.5)
    config = MaskedDiTTransformer2DModel.preset_config(args.model_config)
    assert (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]) == (28, 1152)
    assert config["decoder_num_layers"] == 8
    assert config["decoder_num_attention_heads"] * config["decoder_attention_head_dim"] == 512
    # "the MAE decoder with <9% parameters of DiT-XL/2" (D:97)
    full = {**config, "sample_size": 32, "in_channels": 4, "num_classes": 1000}
    decoder = _meta_parameters(MaskedDiTTransformer2DModel, full) - _meta_parameters(
        MaskedDiTTransformer2DModel, {**full, "decoder_num_layers": 0}
    )
    assert decoder / _meta_parameters(MaskedDiTTransformer2DModel, {**full, "decoder_num_layers": 0}) < 0.09


@pytest.mark.parametrize(
    "name, steps, schedule, guidance", [("imagenet256-xl2-tune", 75_000, "zero", 1.5),
                                        ("imagenet256-xl2-tune-unguided", 37_500, "cosine", 1.0)],
)  # fmt: skip
def test_maskdit_unmasking_tuning_recipes_are_the_papers(name, steps, schedule, guidance):
    args = _parse("train_maskdit", name)
    assert (args.max_train_steps, args.unmask_tuning_steps, args.unmask_schedule) == (0, steps, schedule)
    assert (args.unmask_learning_rate, args.mixed_precision, args.allow_tf32) == (5e-5, "no", True)
    assert args.guidance_scale == guidance and 8 * args.unmask_batch_size < 1024  # "a smaller batch size"
    assert math.isclose(_script("train_maskdit").build_phases(0, steps, batch_size=1, learning_rate=1e-4,
                        mask_schedule=args.mask_schedule_resolved, unmask_schedule=schedule)[0].ratio(0),
                        0.5 if schedule == "cosine" else 0.0)  # fmt: skip


# ------------------------------------------------------------------------- a tiny run of each recipe family


def _images(root, count=16, size=16):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(count // 2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


TINY_DIT = {"patch_size": 2, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
            "decoder_num_layers": 1, "decoder_num_attention_heads": 2, "decoder_attention_head_dim": 16}  # fmt: skip
TINY_UVIT = {"patch_size": 2, "num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 16}
COMMON = ["--report_to", "none", "--cpu_threads", "1", "--validation_steps", "0", "--checkpointing_steps", "0"]
COMMON += ["--num_inference_steps", "2", "--mixed_precision", "no"]


@pytest.mark.slow
def test_a_tiny_run_of_the_maskdit_imagenet_recipe_family_trains(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    data = _images(tmp_path / "data")
    args = ["--recipe", "imagenet256-xl2", "--train_data_dir", str(data), "--vae", str(tmp_path / "vae")]
    args += ["--resolution", "16", "--model_config", json.dumps(TINY_DIT), "--train_batch_size", "4"]
    args += ["--max_train_steps", "2", "--output_dir", str(tmp_path / "out"), *COMMON]
    launch(REPO / "examples" / "train_maskdit.py", *args)
    config = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert config["recipe"] == "imagenet256-xl2@v1" and config["mae_loss_weight"] == 0.1
    assert "imagenet256-xl2@v1" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.slow
def test_a_tiny_run_of_the_staged_maskdm_recipe_family_trains_both_stages(tmp_path):
    data = _images(tmp_path / "data", size=8)
    stages = [{"steps": 2, "mask_ratio": 0.9, "batch_size": 4, "learning_rate": 2e-4},
              {"steps": 2, "mask_ratio": 0.5, "batch_size": 2, "learning_rate": 2e-4, "warmup_steps": 1,
               "max_grad_norm": 1.0}]  # fmt: skip
    args = ["--recipe", "celebahq256", "--train_data_dir", str(data), "--resolution", "8"]
    args += [
        "--model_config",
        json.dumps(TINY_UVIT),
        "--pretrain_stages",
        json.dumps(stages),
        "--mask_block_size",
        "2",
    ]
    args += ["--finetune_steps", "2", "--finetune_batch_size", "2", "--output_dir", str(tmp_path / "out"), *COMMON]
    launch(REPO / "examples" / "train_maskdm.py", *args)
    pretrain = json.loads((tmp_path / "out-pretrain" / "training_config.json").read_text())
    assert pretrain["recipe"] == "celebahq256@v1" and pretrain["max_train_steps"] == 4
    assert pretrain["mask_schedule_resolved"] == {"type": "staged", "stages": [[2, 0.9], [4, 0.5]]}
    assert "celebahq256@v1" in (tmp_path / "out" / "README.md").read_text()
