"""Instance subnets: a clash is replaced by a free default, or refused when fixed."""

from __future__ import annotations

import pytest

from cove import errors
from cove.net import subnets


def test_a_free_proposal_is_kept_and_a_clash_gets_the_first_free_default() -> None:
    mine = subnets.parse("10.213.16.0/24", "fd00:c0e:10:7::/64")
    assert subnets.assign(mine, [], fixed=False) == mine
    others = [("n1", subnets.default_for(16, 7)), ("n2", subnets.default_for(17, 3))]
    got = subnets.assign(mine, others, fixed=False)
    assert str(got.ipv4) == "10.213.18.0/24" and str(got.ipv6) == "fd00:c0e:12:7::/64"
    assert not any(got.overlaps(n) for _, n in others)


def test_an_overlap_of_either_family_is_a_clash() -> None:
    a = subnets.parse("10.213.16.0/24", "fd00:c0e:10::/64")
    assert a.overlaps(subnets.parse("10.213.16.128/25", "fd00:c0e:99::/64"))
    assert a.overlaps(subnets.parse("10.9.0.0/24", "fd00:c0e:10::/64"))
    assert not a.overlaps(subnets.parse("10.9.0.0/24", "fd00:c0e:11::/64"))


def test_a_fixed_clash_and_a_full_range_are_conflicts() -> None:
    mine = subnets.default_for(16)
    with pytest.raises(errors.Conflict, match="overlaps node n1's") as exc:
        subnets.assign(mine, [("n1", mine)], fixed=True)
    assert exc.value.code == "subnet_taken"
    full = [(f"n{t}", subnets.default_for(t)) for t in subnets.THIRDS]
    with pytest.raises(errors.Conflict, match="every default instance subnet"):
        subnets.assign(mine, full, fixed=False)


@pytest.mark.parametrize(
    ("v4", "v6", "words"),
    [
        ("10.213.16.1/24", "fd00::/64", "host bits"),
        ("10.213.16.0/30", "fd00::/64", "/8 to a /29"),
        ("10.0.0.0/24", "fd00::/124", "/48 to a /120"),
        ("224.0.0.0/24", "fd00::/64", "multicast"),
        ("10.0.0.0/24", "fe80::/64", "link-local"),
        ("ten", "fd00::/64", "bad instance subnet"),
    ],
)
def test_bad_subnets_say_what_is_wrong(v4: str, v6: str, words: str) -> None:
    with pytest.raises(errors.UserError, match=words):
        subnets.parse(v4, v6)
