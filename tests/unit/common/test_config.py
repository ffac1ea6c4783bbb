"""common/config.py: from_dict holds Literal fields to their values; check_literals does the same for
a config built in code; require raises the one ConfigError."""

from dataclasses import dataclass
from typing import Literal

import pytest

from common.config import ConfigError, check_literals, from_dict, require
from common.errors import UserError

Mode = Literal["fast", "exact"]


@dataclass(frozen=True)
class Inner:
    mode: Mode = "fast"
    level: Literal[1, 2] | None = None

    def __post_init__(self) -> None:
        check_literals(self, "inner.")


@dataclass(frozen=True)
class Outer:
    inner: Inner
    name: str = "x"


def test_from_dict_refuses_a_value_outside_the_literal_naming_the_path_and_the_values():
    with pytest.raises(ConfigError, match=r"^inner.mode='slow' is not one of the allowed values \['fast', 'exact'\]$"):
        from_dict(Outer, {"inner": {"mode": "slow"}})
    with pytest.raises(ConfigError, match=r"^inner.level=True is not one of the allowed values \[1, 2\]$"):
        from_dict(Outer, {"inner": {"level": True}})  # True == 1, but it is no 1
    with pytest.raises(ConfigError, match=r"^inner.mode=5 is not one of"):
        from_dict(Outer, {"inner": {"mode": 5}})
    cfg = from_dict(Outer, {"inner": {"mode": "exact", "level": 2}})
    assert cfg.inner == Inner("exact", 2)
    assert from_dict(Outer, {"inner": {"level": None}}).inner.level is None


def test_check_literals_holds_a_config_built_in_code():
    with pytest.raises(ConfigError, match=r"^inner.mode='slow' is not one of the allowed values \['fast', 'exact'\]$"):
        Inner(mode="slow")
    with pytest.raises(ConfigError, match=r"inner.level=3"):
        Inner(level=3)
    assert Inner(level=None).mode == "fast"


def test_require_and_the_error_classes():
    require(True, "never")
    with pytest.raises(ConfigError, match="^widgets=3 must be even$"):
        require(False, "widgets=3 must be even")
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
