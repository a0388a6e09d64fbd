import math

import pytest
import torch

from diffusers_masked.masking import (
    ConstantMaskSchedule,
    CosinePowerMaskSchedule,
    LinearMaskSchedule,
    StagedMaskSchedule,
    block_mask,
    check_mask,
    crop_mask,
    generate_mask,
    mask_schedule_from_dict,
    parse_mask_schedule,
    patchify,
    random_mask,
    unpatchify,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_tokens,ratio", [(16, 0.5), (256, 0.75), (10, 0.3), (7, 0.0), (64, 0.99)])
def test_random_mask_removes_exactly_floor_ratio_tokens(num_tokens, ratio):
    mask = random_mask(5, num_tokens, ratio, generator=_gen())
    assert mask.dtype == torch.bool and mask.shape == (5, num_tokens)
    assert mask.sum(1).tolist() == [math.floor(ratio * num_tokens + 1e-9)] * 5


def test_random_mask_same_seed_same_mask_and_different_seed_differs():
    assert torch.equal(random_mask(4, 64, 0.5, generator=_gen(1)), random_mask(4, 64, 0.5, generator=_gen(1)))
    assert not torch.equal(random_mask(4, 64, 0.5, generator=_gen(1)), random_mask(4, 64, 0.5, generator=_gen(2)))


def test_random_mask_is_uniform_over_positions():
    # Every position is removed with probability 1/2; over 4000 draws each frequency is within 5 sigma.
    freq = random_mask(4000, 16, 0.5, generator=_gen()).float().mean(0)
    assert torch.all((freq - 0.5).abs() < 5 * math.sqrt(0.25 / 4000))


def test_block_mask_is_a_union_of_aligned_blocks():
    b = 2
    mask = block_mask(6, (8, 12), 0.5, block_size=b, generator=_gen()).view(6, 8, 12)
    blocks = mask.view(6, 4, b, 6, b)
    # inside each aligned b x b block every entry equals the block's first entry
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    num_blocks = 4 * 6
    assert mask.view(6, -1).sum(1).tolist() == [round(0.5 * num_blocks) * b * b] * 6


def test_block_mask_count_is_nearest_multiple_and_keeps_one_block():
    mask = block_mask(3, 4, 0.9, block_size=2, generator=_gen())  # 4 blocks: round(3.6)=4 -> capped at 3
    assert mask.sum(1).tolist() == [12] * 3


def test_crop_mask_leaves_one_contiguous_visible_rectangle():
    mask = crop_mask(20, (8, 8), 0.75, generator=_gen()).view(20, 8, 8)
    for sample in mask:
        visible = (~sample).nonzero()
        top, left = visible.min(0).values.tolist()
        bottom, right = visible.max(0).values.tolist()
        rect = ~sample[top : bottom + 1, left : right + 1]
        assert rect.all(), "the visible region is not a filled rectangle"
        assert visible.shape[0] == rect.numel() == 16  # 64 - floor(0.75 * 64) = 16 = 4 x 4


def test_crop_mask_positions_vary_and_are_seeded():
    a = crop_mask(50, 8, 0.75, generator=_gen(3))
    assert torch.equal(a, crop_mask(50, 8, 0.75, generator=_gen(3)))
    assert len({tuple(row.tolist()) for row in a}) > 5


def test_generate_mask_dispatches_and_rejects_unknown_type():
    assert generate_mask("patch", 2, (4, 4), 0.5, generator=_gen()).sum().item() == 16
    with pytest.raises(ValueError, match="mask_type"):
        generate_mask("stripes", 2, 4, 0.5)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_invalid_ratio_is_a_value_error_naming_it(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 16, ratio)


def test_block_size_must_divide_grid():
    with pytest.raises(ValueError, match="block_size"):
        block_mask(2, (6, 6), 0.5, block_size=4)


def test_empty_batch_is_a_value_error():
    with pytest.raises(ValueError, match="batch_size"):
        random_mask(0, 16, 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        crop_mask(0, 4, 0.5)


def test_check_mask_rejects_unequal_counts_wrong_dtype_and_shape():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        check_mask(mask, 2, 4)
    with pytest.raises(TypeError, match="dtype"):
        check_mask(mask.int(), 2, 4)
    with pytest.raises(ValueError, match="shape"):
        check_mask(mask, 2, 5)


def test_patchify_unpatchify_are_inverse_and_tokens_are_row_major_patches():
    x = torch.randn(2, 3, 6, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 12, 12)
    assert torch.equal(unpatchify(tokens, 2, 6, 8), x)
    # token 5 = grid row 1, column 1 -> pixels [2:4, 2:4]
    assert torch.equal(tokens[:, 5].reshape(2, 2, 2, 3).permute(0, 3, 1, 2), x[:, :, 2:4, 2:4])


def test_cosine_power_schedule_endpoints_are_maskdit_cosine_ratio():
    s = CosinePowerMaskSchedule(num_steps=100, initial_ratio=0.5, power=4)
    assert s(0) == 0.5
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(1000) == pytest.approx(0.0, abs=1e-12)
    assert s(50) == pytest.approx(0.5 * math.cos(math.pi / 4) ** 4)


def test_linear_and_constant_and_staged_schedules_hit_their_endpoints():
    lin = LinearMaskSchedule(num_steps=10, start_ratio=0.9, end_ratio=0.5)
    assert (
        lin(0) == 0.9
        and lin(10) == pytest.approx(0.5)
        and lin(5) == pytest.approx(0.7)
        and lin(99) == pytest.approx(0.5)
    )
    assert ConstantMaskSchedule(0.3)(12345) == 0.3
    staged = StagedMaskSchedule([(100, 0.9), (200, 0.5)])
    assert [staged(s) for s in (0, 99, 100, 199, 200, 10**6)] == [0.9, 0.9, 0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "schedule",
    [
        ConstantMaskSchedule(0.5),
        CosinePowerMaskSchedule(num_steps=40, initial_ratio=0.5, power=4),
        LinearMaskSchedule(num_steps=7, start_ratio=0.75, end_ratio=0.25),
        StagedMaskSchedule([(5, 0.9), (9, 0.5)]),
    ],
)
def test_schedules_round_trip_through_a_plain_dict(schedule):
    import json

    config = json.loads(json.dumps(schedule.to_dict()))
    rebuilt = mask_schedule_from_dict(config)
    assert rebuilt == schedule
    assert [rebuilt(i) for i in range(12)] == [schedule(i) for i in range(12)]


def test_parse_mask_schedule_reads_numbers_json_and_rejects_garbage():
    assert parse_mask_schedule(None, default_ratio=0.25)(3) == 0.25
    assert parse_mask_schedule("0.5")(3) == 0.5
    staged = parse_mask_schedule('{"type": "staged", "stages": [[5, 0.9], [9, 0.5]]}')
    assert staged(6) == 0.5
    with pytest.raises(ValueError, match="mask_schedule"):
        parse_mask_schedule("half")
    with pytest.raises(ValueError, match="type"):
        parse_mask_schedule('{"type": "zigzag"}')
    with pytest.raises(ValueError, match="increasing"):
        parse_mask_schedule('{"type": "staged", "stages": [[9, 0.9], [5, 0.5]]}')
    with pytest.raises(ValueError, match="num_steps"):
        parse_mask_schedule('{"type": "cosine_power", "num_steps": 0}')


def test_staged_ratios_string_gives_each_range_its_ratio_and_the_open_last_one_for_good():
    from diffusers_masked.masking import parse_mask_schedule

    schedule = parse_mask_schedule("0.9@0-200000,0.5@200000-")
    assert [schedule(s) for s in (0, 199_999, 200_000, 10**7)] == [0.9, 0.9, 0.5, 0.5]


@pytest.mark.parametrize("spec", ["0.9@0-100,0.5@200-", "0.9@0-,0.5@100-", "0.9@10-100", "0.9-0-100", "1.0@0-"])
def test_staged_ratios_with_gaps_open_middles_or_bad_ratios_are_refused(spec):
    from diffusers_masked.masking import parse_mask_schedule

    with pytest.raises(ValueError):
        parse_mask_schedule(spec)
