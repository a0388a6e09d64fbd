"""The training step as an accelerator runs it: no tensor value read per step, diffusers' attention backends,
regional compilation, and every parameter in the graph (so DDP needs no search for unused parameters)."""

import contextlib

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_masked import EDMHeunScheduler, MaskedDDPMScheduler
from diffusers_masked.data import sample_latents
from diffusers_masked.masking import MASK_TYPES, generate_mask, generated_mask_count
from diffusers_masked.schedulers.masked_training import drop_class_labels
from diffusers_masked.training.batches import step_generator
from tests.tiny import tiny_transformer, tiny_uvit

# Every way Python code turns a tensor into host values.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    reads = []
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                reads.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield reads


def _step(model, scheduler, optimizer, step, mask_ratio, mask_type="patch", latent=False):
    """One step as examples/train_maskdit.py takes it: generator, data, label dropout, mask, loss, backward, AdamW."""
    generator = step_generator(0, step, 0, "cpu")
    batch_size, size, patch = 4, model.config.sample_size, model.config.patch_size
    data = torch.Generator().manual_seed(step)
    if latent:
        batch = {
            "latent_mean": torch.randn(batch_size, 3, size, size, generator=data),
            "latent_std": torch.rand(batch_size, 3, size, size, generator=data),
        }
        clean = sample_latents(batch, 0.18, generator=generator)
    else:
        clean = torch.randn(batch_size, 3, size, size, generator=data)
    labels = drop_class_labels(torch.randint(0, 10, (batch_size,), generator=data), 10, 0.1, generator=generator)
    mask, num_masked = None, None
    if mask_ratio:
        grid = (size // patch, size // patch)
        mask = generate_mask(mask_type, batch_size, grid, mask_ratio, generator=generator)
        num_masked = generated_mask_count(mask_type, grid, mask_ratio)
    out = scheduler.masked_training_loss(
        model,
        clean,
        class_labels=labels,
        mask=mask,
        mae_loss_weight=0.1 if mask is not None else 0.0,
        generator=generator,
        num_masked=num_masked,
    )
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "build,scheduler_cls,mask_ratio,latent",
    [
        (tiny_transformer, EDMHeunScheduler, 0.5, True),
        (tiny_transformer, EDMHeunScheduler, 0.0, False),
        (tiny_uvit, MaskedDDPMScheduler, 0.5, False),
    ],
    ids=["maskdit-masked-latents", "maskdit-unmasked", "maskdm-masked"],
)
def test_a_training_step_reads_no_tensor_value_after_the_first(monkeypatch, build, scheduler_cls, mask_ratio, latent):
    model = build(seed=0).train()
    scheduler = scheduler_cls()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    _step(model, scheduler, optimizer, 0, mask_ratio, latent=latent)  # the first step may check values
    with count_host_reads(monkeypatch) as reads:
        for step in (1, 2):
            _step(model, scheduler, optimizer, step, mask_ratio, latent=latent)
    assert reads == []


def test_the_host_read_counter_sees_a_read(monkeypatch):
    # The counter itself: a step given a mask without its count must read it (once), and is seen doing so.
    model = tiny_transformer(seed=0).train()
    generator = torch.Generator().manual_seed(0)
    mask = generate_mask("patch", 2, (4, 4), 0.5, generator=generator)
    with count_host_reads(monkeypatch) as reads:
        model(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([1, 2]), mask=mask)
    assert reads == ["tolist"]


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75])
def test_generated_mask_count_is_the_count_each_generator_removes(mask_type, ratio):
    for grid in [(4, 4), (8, 6)]:
        mask = generate_mask(mask_type, 3, grid, ratio, generator=torch.Generator().manual_seed(1))
        assert mask.sum(dim=1).tolist() == [generated_mask_count(mask_type, grid, ratio)] * 3


def test_a_train_mode_forward_compiles_as_one_graph():
    # fullgraph=True fails on any graph break, which every read of a tensor value would cause.
    model = tiny_transformer(seed=0).train()
    mask = generate_mask("patch", 2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    inputs = (torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    expected = model(*inputs, mask=mask, num_masked=8).sample
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*inputs, mask=mask, num_masked=8).sample, expected)


def test_compile_repeated_blocks_compiles_every_block_and_keeps_the_output():
    model = tiny_transformer(seed=0).train()
    inputs = (torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    expected = model(*inputs).sample
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    blocks = [*model.transformer_blocks, *model.decoder_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    torch.testing.assert_close(model(*inputs).sample, expected)


def test_the_uvit_declares_its_blocks_for_regional_compilation():
    model = tiny_uvit(seed=0)
    torch._dynamo.reset()
    model.compile_repeated_blocks(backend="eager")
    blocks = [*model.in_blocks, model.mid_block, *model.out_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def restore_attention_backend():
    # set_attention_backend also makes its backend diffusers' process-wide default; give the other tests theirs back.
    active = _AttentionBackendRegistry.get_active_backend()[0]
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def _reference_output(model, inputs):
    double = type(model).from_config(model.config).double().eval()
    double.load_state_dict(model.state_dict())
    double.set_attention_backend("_native_math")
    with torch.no_grad():
        return double(inputs[0].double(), inputs[1].double(), inputs[2]).sample


@pytest.mark.parametrize("build", [tiny_transformer, tiny_uvit], ids=["dit", "uvit"])
def test_set_attention_backend_changes_the_kernel_and_keeps_the_output(restore_attention_backend, build):
    model = build(seed=0)
    inputs = (torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    expected = _reference_output(model, inputs)
    outputs, kernels = {}, {}
    for backend in ("native", "_native_math"):
        model.set_attention_backend(backend)
        with RecordOps() as recorder, torch.no_grad():
            outputs[backend] = model(*inputs).sample
        kernels[backend] = recorder.ops
    # torch's fused CPU kernel runs for "native"; the math backend composes attention of matmuls and a softmax.
    assert "_scaled_dot_product_flash_attention_for_cpu" in kernels["native"]
    assert "_scaled_dot_product_flash_attention_for_cpu" not in kernels["_native_math"]
    assert any("softmax" in op for op in kernels["_native_math"])
    for backend, output in outputs.items():
        torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-5, msg=backend)


def test_every_attention_module_takes_the_backend(restore_attention_backend):
    model = tiny_transformer(seed=0)
    model.set_attention_backend("_native_math")
    attentions = [block.attn1 for block in [*model.transformer_blocks, *model.decoder_blocks]]
    assert [a.processor._attention_backend for a in attentions] == [AttentionBackendName._NATIVE_MATH] * len(
        attentions
    )
    model.reset_attention_backend()
    assert all(a.processor._attention_backend is None for a in attentions)


def test_every_parameter_gets_a_gradient_with_and_without_a_mask():
    # DDP with find_unused_parameters=False needs every parameter in every step's graph; unmasked, the mask token
    # enters through a zero-weight term, so its gradient is exactly zero.
    model = tiny_transformer(seed=0).train()
    scheduler = EDMHeunScheduler()
    for mask_ratio in (0.5, 0.0):
        out = scheduler.masked_training_loss(
            model,
            torch.randn(2, 3, 8, 8),
            torch.tensor([1, 2]),
            mask_ratio=mask_ratio,
            generator=torch.Generator().manual_seed(0),
        )
        out.loss.backward()
        assert [name for name, p in model.named_parameters() if p.grad is None] == []
        if mask_ratio == 0.0:
            assert torch.count_nonzero(model.mask_token.grad) == 0
        model.zero_grad(set_to_none=True)


def test_the_zero_weight_mask_token_term_leaves_the_unmasked_output_bit_identical():
    model = tiny_transformer(seed=0)
    inputs = (torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10]))
    with torch.no_grad():
        evaluated = model.eval()(*inputs).sample
    trained = model.train()(*inputs).sample
    assert torch.equal(trained.detach(), evaluated)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_never_synchronises_after_the_first():
    model = tiny_transformer(seed=0).cuda().train()
    scheduler = EDMHeunScheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(index):
        generator = step_generator(0, index, 0, "cuda")
        clean = torch.randn(4, 3, 8, 8, device="cuda", generator=generator)
        labels = drop_class_labels(torch.arange(4, device="cuda"), 10, 0.1, generator=generator)
        mask = generate_mask("patch", 4, (4, 4), 0.5, generator=generator, device="cuda")
        out = scheduler.masked_training_loss(
            model,
            clean,
            labels,
            mask=mask,
            mae_loss_weight=0.1,
            generator=generator,
            num_masked=generated_mask_count("patch", (4, 4), 0.5),
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
        step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
