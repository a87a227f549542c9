"""Which CPUs `nicsplit up` gives each process (nicsplit.core.placement):
the host keeps off the card acker's CPU(s) whenever another CPU is left."""

from __future__ import annotations

import pytest

from nicsplit.appliance.config import server_config
from nicsplit.core.config import Config, ConfigError
from nicsplit.core.placement import PlacementError, acker_cpus, choose, plan


def test_two_cores_defaults_host_gets_the_other_core():
    p = plan({0, 1}, card={}, host={}, appliance={})
    assert p.acker == (1,)
    assert p.host == (0,)
    assert p.appliance is None  # every CPU
    assert p.describe() == {"acker": [1], "host": [0], "appliance": [0, 1]}


def test_one_core_pins_nothing():
    p = plan({0}, card={}, host={}, appliance={"cpus": "auto"})
    assert p.acker == (0,)
    assert p.host is None and p.appliance is None


def test_four_cores_and_an_acker_on_two():
    p = plan({0, 1, 2, 3}, card={"cpus": [2, 3]}, host={}, appliance={"cpus": "auto"})
    assert p.acker == (2, 3)
    assert p.host == (0, 1)
    assert p.appliance == (0, 1)


def test_restricted_allowed_set_follows_the_last_allowed_cpu():
    p = plan({2, 5, 7}, card={}, host={}, appliance={})
    assert p.acker == (7,)
    assert p.host == (2, 5)


def test_unpinned_acker_or_acker_everywhere_leaves_the_host_alone():
    assert plan({0, 1}, card={"cpus": []}, host={}, appliance={}).host is None
    assert plan({0, 1}, card={"cpus": [0, 1]}, host={}, appliance={}).host is None


def test_explicit_lists_and_no_pinning():
    assert plan({0, 1, 2}, card={}, host={"cpus": [1, 0]}, appliance={"cpus": [2]}).host == (0, 1)
    assert plan({0, 1, 2}, card={}, host={"cpus": []}, appliance={}).host is None
    assert plan({0, 1, 2}, card={}, host={}, appliance={"cpus": [2]}).appliance == (2,)


@pytest.mark.parametrize("value", [[4], "all", [True], 1])
def test_bad_values_are_refused_with_the_key(value):
    with pytest.raises(PlacementError, match=r"\[host\] cpus"):
        plan({0, 1}, card={}, host={"cpus": value}, appliance={})


def test_acker_cpus_mirrors_pin_cpus_default():
    assert acker_cpus((0, 1, 2), None) == (2,)
    assert acker_cpus((0, 1, 2), []) is None
    assert acker_cpus((0, 1, 2), [0]) == (0,)
    assert choose((0, 1), (1,), "auto", "k") == (0,)


def test_the_appliance_accepts_its_cpus_key(tmp_path):
    """`[appliance] cpus` is `up`'s key: the appliance's own strict key check lets it through."""
    server_config(Config(data=tmp_path, raw={"appliance": {"cpus": "auto"}}))
    with pytest.raises(ConfigError, match="unknown key"):
        server_config(Config(data=tmp_path, raw={"appliance": {"cpu": "auto"}}))
