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
    assert p.describe() == {"acker": [1], "host": [0], "appliance": [0, 1], "console": [0, 1], "acker_core": "shared"}


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


# -- a dedicated acker core ([card] acker_core = "dedicated") -------------------------------


def test_dedicated_core_keeps_everything_else_off_the_acker():
    p = plan({0, 1}, card={"acker_core": "dedicated"}, host={}, appliance={})
    assert p.dedicated and p.acker == (1,)
    assert p.host == (0,) and p.appliance == (0,) and p.console == (0,)
    assert p.describe()["acker_core"] == "dedicated"
    p = plan({0, 1, 2, 3}, card={"acker_core": "dedicated", "cpus": [3]}, host={"cpus": [0, 1]},
             appliance={"cpus": [2]})
    assert p.host == (0, 1) and p.appliance == (2,) and p.console == (0, 1, 2)


@pytest.mark.parametrize("allowed, card, host, appliance, words", [
    ({0}, {}, {}, {}, "leaves no CPU"),
    ({0, 1}, {"cpus": []}, {}, {}, "needs the acker pinned"),
    ({0, 1}, {}, {"cpus": [1]}, {}, "[host] cpus = [1] shares the dedicated acker core"),
    ({0, 1}, {}, {"cpus": []}, {}, "[host] cpus = [] shares"),
    ({0, 1}, {}, {}, {"cpus": [0, 1]}, "[appliance] cpus = [0, 1] shares"),
])
def test_a_dedicated_core_that_cannot_be_is_refused(allowed, card, host, appliance, words):
    with pytest.raises(PlacementError) as e:
        plan(allowed, card={"acker_core": "dedicated", **card}, host=host, appliance=appliance)
    assert words in str(e.value)


def test_unknown_acker_core_is_refused():
    with pytest.raises(PlacementError, match="acker_core must be"):
        plan({0, 1}, card={"acker_core": "exclusive"}, host={}, appliance={})
