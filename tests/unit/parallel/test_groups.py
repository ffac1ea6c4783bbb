import pytest

from parallel.groups import ParallelConfigError, validate_sizes


def test_world_not_divisible_by_ep_size_names_numbers_and_choices():
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by ep_size=4; choose ep_size in \[1, 2, 3, 6\]"):
        validate_sizes(6, 4, 8)


def test_experts_not_divisible_by_ep_size():
    with pytest.raises(ParallelConfigError, match=r"num_experts=6 is not divisible by ep_size=4"):
        validate_sizes(8, 4, 6)
    with pytest.raises(ParallelConfigError, match="ep_size=0"):
        validate_sizes(8, 0, 8)
    validate_sizes(8, 4, 8)  # fine
