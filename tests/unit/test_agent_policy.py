"""The owner's policy file: defaults, the example file, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.policy import Policy, PolicyError, load_policy, parse_policy, price_to_micros, select_gpus
from agents.probe import SimulatedProbe

EXAMPLE = Path(__file__).resolve().parents[2] / "agents" / "example-policy.toml"


def test_minimal_policy_takes_the_defaults() -> None:
    policy = parse_policy('floor_price = "1.80"')

    assert policy == Policy(floor_price="1.80")
    assert (policy.firm_window_s, policy.reclaim_notice_s, policy.reclaim_rate_per_h, policy.offer_horizon_s,
            policy.gpus, policy.on_lease_start, policy.on_lease_end, policy.fabric) == (
        0, 120, 0.0, 86_400, "all", None, None, None)
    assert policy.floor_price_micros == 1_800_000
    assert policy.renew_before_s == 21_600


def test_full_policy_parses() -> None:
    policy = parse_policy("""
        floor_price = "2.123456"
        firm_window_s = 3600
        reclaim_notice_s = 300
        reclaim_rate_per_h = 0
        offer_horizon_s = 7200
        offer_renew_before_s = 600
        gpus = [0, 3, "GPU-abc"]
        on_lease_start = "echo start"
        on_lease_end = "echo end"
        hook_timeout_s = 5
        fabric = "pod-a"
    """)

    assert policy.floor_price_micros == 2_123_456
    assert policy.reclaim_rate_per_h == 0.0
    assert policy.gpus == [0, 3, "GPU-abc"]
    assert policy.renew_before_s == 600
    assert policy.hook_timeout_s == 5.0


def test_the_example_policy_file_loads() -> None:
    policy = load_policy(EXAMPLE)

    assert policy.floor_price == "1.80"
    assert policy.on_lease_start and policy.on_lease_end


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("", "missing required key `floor_price`"),
        ('floor_price = "1.8000001"', "floor_price: '1.8000001' is not a decimal price with at most 6 decimals"),
        ('floor_price = "-1"', "floor_price"),
        ('floor_price = "1e3"', "floor_price"),
        ("floor_price = 1.80", 'floor_price: write it as a quoted decimal string, e.g. floor_price = "1.8"'),
        ('floor_price = "1.80"\nfirm_window_s = -5', "firm_window_s: Expected `int` >= 0"),
        ('floor_price = "1.80"\nfirm_window_s = 1.5', "firm_window_s: Expected `int`, got `float`"),
        ('floor_price = "1.80"\nreclaim_rate_per_h = -0.1', "reclaim_rate_per_h"),
        ('floor_price = "1.80"\noffer_horizon_s = 0', "offer_horizon_s"),
        ('floor_price = "1.80"\ngpus = "some"', "gpus: must be \"all\" or a list"),
        ('floor_price = "1.80"\ngpus = []', "gpus: an empty list"),
        ('floor_price = "1.80"\ngpus = [1, 1]', "gpus: [1, 1] names a GPU twice"),
        ('floor_price = "1.80"\ngpus = [true]', "gpus[0]"),
        ('floor_price = "1.80"\non_lease_start = " "', "on_lease_start: empty"),
        ('floor_price = "1.80"\nflor_price = "2"', "unknown key `flor_price`"),
        ('floor_price = "1.80"\noffer_horizon_s = 100\noffer_renew_before_s = 100', "offer_renew_before_s"),
        ("floor_price = ", "not valid TOML"),
    ],
)
def test_bad_policies_name_the_file_and_the_key(toml: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(toml, source="host.toml")

    assert str(caught.value).startswith("host.toml: ")
    assert message in str(caught.value)


def test_a_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "nope.toml")


def test_price_to_micros() -> None:
    assert price_to_micros("0") == 0
    assert price_to_micros("2.35") == 2_350_000
    assert price_to_micros("10.000001") == 10_000_001
    with pytest.raises(ValueError):
        price_to_micros("2.")


def test_select_gpus_by_index_and_uuid_in_inventory_order() -> None:
    inventory = SimulatedProbe("4xH100-80GB", seed=0, host="h1").inventory()

    assert select_gpus(Policy(floor_price="1"), inventory) == inventory
    chosen = select_gpus(Policy(floor_price="1", gpus=[inventory[3].uuid, 1]), inventory)
    assert chosen == [inventory[1], inventory[3]]


def test_select_gpus_names_a_gpu_the_host_lacks() -> None:
    inventory = SimulatedProbe("2xH100-80GB", seed=0, host="h1").inventory()

    with pytest.raises(PolicyError, match="gpus: this host has no GPU 5"):
        select_gpus(Policy(floor_price="1", gpus=[5]), inventory)
