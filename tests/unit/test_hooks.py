"""The levels the guest hooks lead to (strategy.Hooks, HookRun); the hooks themselves run on real guests in
tests/functional/test_application_consistency.py."""

from __future__ import annotations

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup.sh")

from raksha.hypervisor.strategy import (
    APPLICATION,
    CRASH,
    FILESYSTEM,
    LEVELS,
    HookRun,
    Hooks,
)
from raksha.services.views import CONSISTENCY_ORDER, weakest


def test_hooks_run_only_when_application_is_wanted() -> None:
    custom = Hooks(pre_freeze="/opt/app/quiesce", post_thaw=None, timeout=5)
    assert Hooks.for_level(None) == Hooks()
    assert Hooks.for_level(APPLICATION, custom) is custom
    assert Hooks.for_level(FILESYSTEM, custom) is None and Hooks.for_level(CRASH) is None
    assert Hooks().timeout == 60 and Hooks().pre_freeze == "/etc/raksha/hooks/pre-freeze"


def test_application_needs_the_freeze_and_a_good_pre_freeze_hook() -> None:
    hooked, other = object(), object()
    run = HookRun(ok=[hooked], started=[hooked, other])
    assert run.reached(hooked, FILESYSTEM) == APPLICATION
    assert run.reached(hooked, CRASH) == CRASH  # the hook ran but the freeze failed
    assert run.reached(other, FILESYSTEM) == FILESYSTEM  # started but failed or timed out
    assert list(LEVELS) == CONSISTENCY_ORDER
    assert weakest([APPLICATION, FILESYSTEM, APPLICATION]) == FILESYSTEM


def test_an_unknown_wanted_level_is_refused() -> None:
    from raksha.domain.errors import InvalidInput
    from raksha.hypervisor.group_backup import backup_domains

    with pytest.raises(InvalidInput) as err:
        backup_domains(None, [], None, "job", "run", consistency="app")  # type: ignore[arg-type]
    assert err.value.code == "INVALID_CONSISTENCY"
