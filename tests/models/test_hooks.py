"""service.models.hooks: every hook is gone when its block ends, and the thread's count says so."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from service.models import hooks


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_run_in_order_and_are_removed_even_when_the_pass_raises() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    fired: list[str] = []

    def note(label: str):  # type: ignore[no-untyped-def]
        return lambda *_: fired.append(label)

    with (
        pytest.raises(RuntimeError, match="boom"),
        hooks.forward_hooks([(model[2], note("last")), (model[0], note("first"))]),
        hooks.forward_pre_hook(model[1], note("pre")),
        hooks.forward_hook([model[0], model[1]], note("both")),
    ):
        assert hooks.held() == 5 and hook_count(model) == 5
        model(torch.zeros(1, 2))
        raise RuntimeError("boom")
    assert fired == ["first", "both", "pre", "both", "last"]
    assert hook_count(model) == 0 and hooks.held() == 0


def test_a_hook_that_returns_a_value_replaces_the_output() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Identity())
    with hooks.forward_hook(model[0], lambda *_: torch.full((1, 2), 7.0)):
        assert model(torch.zeros(1, 2)).tolist() == [[7.0, 7.0]]
    assert model(torch.zeros(1, 2)).tolist() != [[7.0, 7.0]]


def test_the_count_is_per_thread() -> None:
    model = nn.Linear(2, 2)
    seen: list[int] = []
    with hooks.forward_hook(model, lambda *_: None):
        thread = threading.Thread(target=lambda: seen.append(hooks.held()))
        thread.start()
        thread.join()
        assert hooks.held() == 1
    assert seen == [0]
