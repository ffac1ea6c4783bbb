"""NCCL failure policy (parallel/nccl.py): the environment and timeouts set before the process group,
and the named, timed wait of the collectives the host reads at once. What only a GPU can show (NCCL's
watchdog, a peer dying under NCCL) is not tested here; the named wait is exercised on gloo, in processes:
tests/integration/test_nccl.py."""


from parallel.nccl import NCCL_ENV_DEFAULTS, apply_nccl_env, group_timeout_s, watchdog_grace_s


def test_defaults_are_set_only_where_the_user_set_nothing():
    env = {"PATH": "/bin"}
    added = apply_nccl_env(env)
    assert added == NCCL_ENV_DEFAULTS and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["TORCH_NCCL_BLOCKING_WAIT"] == "0"

    mine = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_BLOCKING_WAIT": "1"}  # new and old names
    assert apply_nccl_env(mine) == {}
    assert mine == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_BLOCKING_WAIT": "1"}


def test_the_watchdog_fires_after_the_named_wait_on_nccl_only():
    assert group_timeout_s("gloo", 300) == 300 and group_timeout_s("gloo", 8) == 8
    assert group_timeout_s("nccl", 300) == 330 and group_timeout_s("nccl", 8) == 18
    assert watchdog_grace_s(5) == 10 and watchdog_grace_s(1000) == 100
