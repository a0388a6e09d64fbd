"""examples/train_dit.py: diffusers' own DiT, trained plainly or with token routing, saved as a stock DiTPipeline."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_masked.training.checkpoints import list_checkpoints
from tests.launch import assert_same_weights, env, kill_when, launch, weights
from tests.tiny import tiny_vae

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_dit.py"
TINY_DIT = json.dumps({"num_layers": 6, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2})
ROUTE = '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]'


def _load_script():
    spec = importlib.util.spec_from_file_location("train_dit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = _load_script()


@pytest.fixture(scope="module")
def data_and_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-data")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "owl"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(6):
            image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / label / f"{i}.png")
    tiny_vae().save_pretrained(root / "vae")  # 16x16 images -> 4x8x8 latents
    return root / "images", root / "vae"


def _run_args(data_and_vae, out, *extra):
    images, vae = data_and_vae
    return [
        "--train_data_dir", str(images), "--vae", str(vae), "--resolution", "16",
        "--model_config", TINY_DIT, "--train_batch_size", "6", "--num_inference_steps", "2",
        "--num_validation_images_per_class", "1", "--validation_classes", "2", "--validation_steps", "0",
        "--report_to", "none", "--cpu_threads", "1", "--cache_dir", str(out.parent / "cache"),
        "--output_dir", str(out), *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ flags


def test_flags_default_to_dits_recipe_and_refuse_what_cannot_train(tmp_path, capsys):
    args = train.parse_args(["--train_data_dir", str(tmp_path), "--vae", str(tmp_path)])
    assert args.recipe == "default@v1" and args.model_config == "B/2" and args.learning_rate == 1e-4
    assert args.model_config_resolved == {
        "num_layers": 12,
        "num_attention_heads": 12,
        "attention_head_dim": 64,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
    }
    assert args.tread_routes is None and args.mask_ratio == 0.0
    routed = train.parse_args(["--recipe", "imagenet256-tread-xl2"])
    assert json.loads(routed.tread_routes) == [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]
    assert routed.model_config_resolved["num_layers"] == 28
    for argv, match in [
        ([], "needs --dataset_name or --train_data_dir"),
        (["--train_data_dir", str(tmp_path)], "needs --vae"),
        (
            ["--train_data_dir", str(tmp_path), "--vae", str(tmp_path), "--tread_routes", '[{"selection_ratio": 2}]'],
            "--tread_routes: route 0 .*must have exactly the keys",
        ),
        (
            [
                "--train_data_dir", str(tmp_path), "--vae", str(tmp_path), "--model_config", "S/2",
                "--tread_routes", '[{"selection_ratio": 0.5, "start_layer_idx": 8, "end_layer_idx": 3}]',
            ],
            r"start_layer_idx \(8\) must be <= end_layer_idx \(3\)",
        ),
        (["--train_data_dir", str(tmp_path), "--vae", str(tmp_path), "--model_config", "M/2"], "--model_config"),
        (["--train_data_dir", str(tmp_path), "--vae", str(tmp_path), "--num_classes", "0"], "class-conditional"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert __import__("re").search(match, capsys.readouterr().err), (argv, match)


def test_build_dit_fills_in_the_data_and_switches_off_the_blocks_label_dropout():
    from types import SimpleNamespace

    from diffusers.models.embeddings import LabelEmbedding

    from diffusers_masked.training.models import build_dit, dit_preset_config

    data = SimpleNamespace(sample_size=8, in_channels=4, num_classes=3)
    model = build_dit(data, config={**dit_preset_config("S/2"), "num_layers": 2})
    config = model.config
    assert (config.sample_size, config.in_channels, config.out_channels, config.num_embeds_ada_norm) == (8, 4, 4, 1000)
    embedders = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    assert len(embedders) == 2 and all(m.dropout_prob == 0 for m in embedders)
    assert all(m.embedding_table.num_embeddings == 1001 for m in embedders)  # the null row DiTPipeline uses
    with pytest.raises(ValueError, match="learned variance"):
        build_dit(data, config={"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "out_channels": 8})
    with pytest.raises(ValueError, match="null class 1000"):
        build_dit(
            data,
            config={"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 10},
        )


def test_configure_model_refuses_an_attention_backend_a_stock_dit_ignores_and_compiles_its_blocks():
    from diffusers import DiTTransformer2DModel

    from diffusers_masked.training.models import configure_model

    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8
    )
    with pytest.raises(ValueError, match="AttnProcessor2_0.*silently ignored"):
        configure_model(model, attention_backend="flash")
    configure_model(model, torch_compile=True)
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in model.transformer_blocks)


# ------------------------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_a_routed_run_saves_and_pushes_a_stock_dit_pipeline_that_loads_without_this_package(data_and_vae, tmp_path):
    from tests.hub_stand_in import HubStandIn

    out, repo = tmp_path / "run", "org/dit-tiny"
    hub_env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "stand-in-token", "NO_PROXY": "127.0.0.1,localhost"}
    with HubStandIn() as hub:
        launch(
            SCRIPT,
            *_run_args(data_and_vae, out, "--max_train_steps", "3", "--tread_routes", ROUTE),
            "--push_to_hub", "--hub_model_id", repo,
            HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "pusher"), **hub_env,
        )  # fmt: skip
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == "DiTPipeline"
        components = {k: v for k, v in index.items() if not k.startswith("_")}
        assert components == {
            "scheduler": ["diffusers", "DDIMScheduler"],
            "transformer": ["diffusers", "DiTTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        assert not list(out.rglob("*.py"))
        card = (out / "README.md").read_text()
        assert "library_name: diffusers" in card and "token routing (TREAD" in card
        assert "DiffusionPipeline.from_pretrained" in card and "needs neither diffusers-masked" in card
        config = json.loads((out / "transformer" / "config.json").read_text())
        assert "tread" not in json.dumps(config) and config["out_channels"] == 4
        assert json.loads((out / "training_config.json").read_text())["tread_routes"] == json.dumps(json.loads(ROUTE))
        pushed = hub.files(repo)
        for name in (
            "model_index.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "README.md",
            "samples.png",
        ):
            assert pushed[name] == (out / name).read_bytes(), name

        # Fresh interpreters in which diffusers_masked cannot be imported at all: from the folder, and by repo id.
        for source in (str(out), repo):
            script = textwrap.dedent(
                f"""
                import sys
                sys.modules["diffusers_masked"] = None  # any import of it now fails
                from diffusers import DiffusionPipeline, DiTPipeline
                pipe = DiffusionPipeline.from_pretrained({source!r})
                assert type(pipe) is DiTPipeline, type(pipe)
                pipe.set_progress_bar_config(disable=True)
                images = pipe(class_labels=[0, 2], num_inference_steps=2, output_type="np").images
                assert images.shape == (2, 16, 16, 3) and (images >= 0).all() and (images <= 1).all(), images.shape
                print("STOCK-OK")
                """
            )
            environment = {**env(), **hub_env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "loader")}
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environment
            )
            assert "STOCK-OK" in result.stdout, (source, result.stderr[-3000:])


@pytest.mark.slow
def test_routing_changes_the_training_and_a_killed_routed_run_resumes_to_the_same_weights(data_and_vae, tmp_path):
    common = ["--max_train_steps", "24", "--checkpointing_steps", "6"]
    reference = tmp_path / "reference"
    launch(SCRIPT, *_run_args(data_and_vae, reference, *common, "--tread_routes", ROUTE))
    plain = tmp_path / "plain"
    launch(SCRIPT, *_run_args(data_and_vae, plain, *common))
    final = "transformer/diffusion_pytorch_model.safetensors"
    a, b = weights(reference / final), weights(plain / final)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the routes were applied

    killed = tmp_path / "killed"
    kill_when(SCRIPT, _run_args(data_and_vae, killed, *common, "--tread_routes", ROUTE), killed / "checkpoint-12")
    launch(
        SCRIPT,
        *_run_args(data_and_vae, killed, *common, "--tread_routes", ROUTE, "--resume_from_checkpoint", "latest"),
    )
    assert_same_weights(weights(killed / final), a)
    assert [p.name for p in list_checkpoints(killed)][-1] == "checkpoint-24"


@pytest.mark.slow
def test_a_routed_fsdp2_run_on_cpu_trains_exactly_like_ddp(data_and_vae, tmp_path):
    # FSDP2 shards each BasicTransformerBlock (tests/fsdp_on_cpu.py); the routing hooks sit beside FSDP's own on the
    # same blocks. Two processes, sharded EMA and checkpoints, the gathered EMA weights at the end.
    common = [
        "--max_train_steps",
        "3",
        "--train_batch_size",
        "3",
        "--checkpointing_steps",
        "2",
        "--tread_routes",
        ROUTE,
    ]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch(SCRIPT, *_run_args(data_and_vae, ddp, *common), num_processes=2)
    launch(SCRIPT, *_run_args(data_and_vae, fsdp, *common), num_processes=2, fsdp=True)
    assert (fsdp / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    final = "transformer/diffusion_pytorch_model.safetensors"
    assert_same_weights(weights(fsdp / final), weights(ddp / final))
