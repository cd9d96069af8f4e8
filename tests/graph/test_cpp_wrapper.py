"""Graph mode's choice of inductor's C++ wrapper for CPU steps (compile.with_cpp_wrapper), and who overrides it."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dualmode.graph.compile import CPU_BUILD, CPU_BUILD_ENV, with_cpp_wrapper


def traced(device: str) -> torch.fx.GraphModule:
    return make_fx(lambda x, w: (x * w).sum())(torch.ones(3, device=device), torch.ones(3, device=device))


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for name in CPU_BUILD_ENV:
        monkeypatch.delenv(name, raising=False)


def test_a_cpu_step_gets_the_cpp_wrapper_and_keeps_the_other_options():
    three = {"cpp_wrapper": True, "cpp_cache_precompile_headers": False, "cpp_wrapper_build_separate": True}
    assert CPU_BUILD == three and with_cpp_wrapper(traced("cpu"), None) == three
    extra = {"max_autotune": False}
    assert with_cpp_wrapper(traced("cpu"), extra) == {"max_autotune": False, **three}
    assert extra == {"max_autotune": False}  # the user's dict is not changed


@pytest.mark.parametrize("key", sorted(CPU_BUILD))
@pytest.mark.parametrize("choice", [False, True])
def test_the_users_own_choice_of_any_wins(key, choice):
    assert with_cpp_wrapper(traced("cpu"), {key: choice}) == {key: choice}


@pytest.mark.parametrize("name", CPU_BUILD_ENV)
def test_the_environment_wins(monkeypatch, name):
    monkeypatch.setenv(name, "0")
    assert with_cpp_wrapper(traced("cpu"), None) is None


def test_a_step_on_another_device_is_left_as_inductor_would_have_it():
    # Measured on the CPU only (one gcc build instead of one per kernel); elsewhere inductor's default stands.
    assert with_cpp_wrapper(traced("meta"), None) is None
    assert with_cpp_wrapper(make_fx(lambda: torch.ones(2))(), None) is None  # no tensor input at all
