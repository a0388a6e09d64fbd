"""Loading by Hub repo id and `push_to_hub`, over HTTP against a local stand-in of the Hub (tests/hub_stand_in.py).

Every load runs in a fresh process (as a user's would) pointed at the stand-in with `HF_ENDPOINT`, with its own empty
cache, so each file really travels over HTTP.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline
from tests.hub_stand_in import HubStandIn
from tests.tiny import tiny_transformer

REPO = "org/maskdit"
CALL = "class_labels=[3, 7], num_inference_steps=3"
PAYLOAD = "import pathlib, os\npathlib.Path(os.environ['MARKER']).write_text('ran')\n"


@pytest.fixture
def hub():
    with HubStandIn() as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline's folder and the images it gives with the seed the fresh processes use."""
    folder = tmp_path_factory.mktemp("pipeline")
    pipe = MaskDiTPipeline(tiny_transformer(seed=0), EDMHeunScheduler(), id2label={i: str(i) for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    images = pipe(
        class_labels=[3, 7], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)
    )
    torch.save(images.images, folder.parent / "expected.pt")
    return folder


def run_fresh(script: str, hub: HubStandIn | None, home: Path, offline: bool = False, **env) -> str:
    """Run `script` in a new interpreter talking to the stand-in (or offline), with `home` as its HF_HOME."""
    environment = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "stand-in-token",
        "NO_PROXY": "127.0.0.1,localhost",
        **env,
    }
    if hub is not None:
        environment["HF_ENDPOINT"] = hub.url
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0 and "DONE" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def load_both_ways(hub, home, repo, expected, offline=False, pipeline="MaskDiTPipeline", call=CALL):
    """In a fresh process, load `repo` with diffusers' `DiffusionPipeline` and with ours; generate; compare."""
    loaders = [f"{pipeline}.from_pretrained(repo)"]
    if not offline:
        # diffusers 0.42 asks the Hub for the commit of a custom pipeline module even offline (model_info in
        # get_cached_module_file), so only our class loads a cached repo by id offline.
        loaders.insert(0, "DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)")
    script = f"""
        import torch
        from diffusers import DiffusionPipeline
        from diffusers_masked import {pipeline}
        repo, expected = {repo!r}, torch.load({str(expected)!r})
        for pipe in ({", ".join(loaders)},):
            assert type(pipe) is {pipeline}, type(pipe)
            pipe.set_progress_bar_config(disable=True)
            images = pipe({call}, output_type="pt", generator=torch.Generator().manual_seed(0)).images
            torch.testing.assert_close(images, expected)
        print("DONE")
    """
    return run_fresh(script, hub, home, offline=offline)


@pytest.mark.slow
def test_a_served_folder_loads_by_repo_id_both_ways_and_generates_the_same_images(hub, saved, tmp_path):
    hub.add_folder(REPO, saved)
    load_both_ways(hub, tmp_path / "home", REPO, saved.parent / "expected.pt")
    downloaded = {path for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert f"/{REPO}/resolve/{hub.repos[REPO][-1][0]}/transformer/diffusion_pytorch_model.safetensors" in downloaded


@pytest.mark.slow
def test_push_to_hub_then_load_what_was_pushed_and_the_card_snippet_runs(hub, saved, tmp_path):
    push = f"""
        from diffusers_masked import MaskDiTPipeline
        MaskDiTPipeline.from_pretrained({str(saved)!r}).push_to_hub("maskdit", training_config={{"mask_ratio": 0.5}})
        print("DONE")
    """
    run_fresh(push, hub, tmp_path / "pusher")
    repo = "stand-in-user/maskdit"  # the stand-in's user owns a repo created without a namespace
    files = hub.files(repo)
    assert {"model_index.json", "pipeline_maskdit.py", "transformer/masked_dit.py", "README.md"} <= set(files)
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    load_both_ways(hub, tmp_path / "loader", repo, saved.parent / "expected.pt")

    # The card's "Use" snippet, exactly as written, works for the repo it was pushed to.
    card = files["README.md"].decode()
    snippet = re.search(r"## Use\n.*?```python\n(.*?)```", card, re.S).group(1)
    assert f'DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)' in snippet
    run_fresh(snippet + "\nassert len(images) == 2\nprint('DONE')\n", hub, tmp_path / "card-reader")


@pytest.mark.slow
def test_a_cached_repo_loads_by_id_offline_with_our_class_without_a_request(hub, saved, tmp_path):
    hub.add_folder(REPO, saved)
    home = tmp_path / "home"
    load_both_ways(hub, home, REPO, saved.parent / "expected.pt")
    before = len(hub.requests)
    load_both_ways(hub, home, REPO, saved.parent / "expected.pt", offline=True)
    assert len(hub.requests) == before


def _evil_class_name(folder: Path):
    # (a) The shim stays pristine; another top-level module runs a payload and then imports our class.
    (folder / "evil.py").write_text(PAYLOAD + "from diffusers_masked import MaskDiTPipeline  # noqa\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["evil", "MaskDiTPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _evil_component(folder: Path):
    # (b) The transformer entry points at a module in the component folder that runs a payload.
    (folder / "transformer" / "evil_transformer.py").write_text(
        PAYLOAD + "from diffusers_masked import MaskedDiTTransformer2DModel  # noqa\n"
    )
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["evil_transformer", "MaskedDiTTransformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))


def _extra_code_file(folder: Path):
    # Any code file we did not write refuses the load, even one that model_index.json does not name.
    (folder / "scheduler" / "helpers.py").write_text(PAYLOAD)


def _tampered_component_shim(folder: Path):
    (folder / "transformer" / "masked_dit.py").write_text(
        PAYLOAD + "from diffusers_masked.models.masked_dit import MaskedDiTTransformer2DModel  # noqa: F401\n"
    )


ATTACKS = [_evil_class_name, _evil_component, _extra_code_file, _tampered_component_shim]


def _copy(saved: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, target))


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda f: f.__name__.strip("_"))
def test_from_pretrained_without_flag_refuses_foreign_code_in_a_folder(saved, tmp_path, attack, monkeypatch):
    folder = _copy(saved, tmp_path / "pipe")
    attack(folder)
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        MaskDiTPipeline.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("content", ['{"_class_name": ', '["not", "an", "object"]'], ids=["not-json", "a-list"])
def test_a_damaged_model_index_is_refused_in_one_line_naming_it(saved, tmp_path, content):
    folder = _copy(saved, tmp_path / "pipe")
    (folder / "model_index.json").write_text(content)
    with pytest.raises(ValueError, match=r"pipe/model_index.json is (damaged|not a pipeline index)") as error:
        MaskDiTPipeline.from_pretrained(folder)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_hub_repo_with_a_damaged_model_index_is_refused_naming_it(hub, saved, tmp_path):
    folder = _copy(saved, tmp_path / "pipe")
    (folder / "model_index.json").write_text('{"_class_name": ')
    hub.add_folder(REPO, folder)
    script = f"""
        from diffusers_masked import MaskDiTPipeline
        try:
            MaskDiTPipeline.from_pretrained({REPO!r})
        except ValueError as error:
            assert "model_index.json is damaged" in str(error) and "\\n" not in str(error), error
            print("DONE")
    """
    run_fresh(script, hub, tmp_path / "home")
    assert not any(path.endswith(".safetensors") for _, path in hub.requests)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS[:2], ids=lambda f: f.__name__.strip("_"))
def test_from_pretrained_without_flag_refuses_foreign_code_in_a_hub_repo(hub, saved, tmp_path, attack):
    folder = _copy(saved, tmp_path / "pipe")
    attack(folder)
    hub.add_folder(REPO, folder)
    marker = tmp_path / "marker"
    script = f"""
        from diffusers_masked import MaskDiTPipeline
        try:
            MaskDiTPipeline.from_pretrained({REPO!r})
        except ValueError as error:
            assert "trust_remote_code=True" in str(error), error
            print("DONE")
    """
    run_fresh(script, hub, tmp_path / "home", MARKER=str(marker))
    assert not marker.exists()
    # What was refused is never even downloaded: only model_index.json and the files being checked are read.
    assert not any(path.endswith(".safetensors") for _, path in hub.requests)


@pytest.mark.slow
def test_the_repo_is_loaded_at_the_commit_that_was_checked(hub, saved, tmp_path):
    # A push between the check and the download must not swap in unchecked code: the load is pinned to a sha.
    hub.add_folder(REPO, saved)
    script = f"""
        from unittest import mock
        from diffusers import DiffusionPipeline
        from diffusers_masked import MaskDiTPipeline
        seen = {{}}
        original = DiffusionPipeline.from_pretrained.__func__
        def spy(cls, name, **kwargs):
            seen.update(kwargs)
            return original(cls, name, **kwargs)
        with mock.patch.object(DiffusionPipeline, "from_pretrained", classmethod(spy)):
            MaskDiTPipeline.from_pretrained({REPO!r})
        assert seen["revision"] == {hub.repos[REPO][-1][0]!r} and seen["trust_remote_code"] is True, seen
        print("DONE")
    """
    run_fresh(script, hub, tmp_path / "home")


def test_a_folder_saved_by_version_0_1_still_loads(saved, tmp_path):
    # 0.1 named our components by module path, with no shim in their folders.
    folder = _copy(saved, tmp_path / "old")
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers_masked.models.masked_dit", "MaskedDiTTransformer2DModel"]
    index["scheduler"] = ["diffusers_masked.schedulers.scheduling_edm_heun", "EDMHeunScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "masked_dit.py").unlink()
    (folder / "scheduler" / "scheduling_edm_heun.py").unlink()
    pipe = MaskDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        class_labels=[3, 7], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(images.images, torch.load(saved.parent / "expected.pt"))


@pytest.mark.slow
def test_a_converted_official_checkpoint_loads_by_repo_id_both_ways(hub, tmp_path):
    from tests.test_conversion import make_converted_pipeline_folder

    folder = make_converted_pipeline_folder(tmp_path / "converted")
    pipe = MaskDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        class_labels=[3, 7], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)
    )
    torch.save(images.images, tmp_path / "expected.pt")
    hub.add_folder("org/maskdit-converted", folder)
    load_both_ways(hub, tmp_path / "home", "org/maskdit-converted", tmp_path / "expected.pt")


@pytest.mark.slow
def test_a_maskdm_pipeline_loads_by_repo_id_both_ways(hub, tmp_path):
    from diffusers_masked import MaskDMPipeline
    from tests.tiny import tiny_uvit

    pipe = MaskDMPipeline(tiny_uvit(seed=0, num_classes=4), MaskDMPipeline.default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "maskdm")
    call = "class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=3"
    images = pipe(
        class_labels=[1, 2],
        guidance_scale=2.0,
        num_inference_steps=3,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    torch.save(images, tmp_path / "expected.pt")
    hub.add_folder("org/maskdm", tmp_path / "maskdm")
    load_both_ways(
        hub, tmp_path / "home", "org/maskdm", tmp_path / "expected.pt", pipeline="MaskDMPipeline", call=call
    )
