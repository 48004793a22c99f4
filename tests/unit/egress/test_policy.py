"""The egress policy: what the API accepts, how rules decide, and the ruleset it compiles to."""

from __future__ import annotations

import pytest

from opensandbox_platform.egress import policy as P


def rules(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"action": a, "target": t} for a, t in pairs]


def test_targets_are_normalized_and_classified() -> None:
    assert P.parse_target("PyPI.org.") == ("name", "pypi.org")
    assert P.parse_target("*.Example.COM") == ("wildcard", "*.example.com")
    assert P.parse_target("10.1.2.3") == ("cidr", "10.1.2.3/32")
    assert P.parse_target("10.1.2.3/16") == ("cidr", "10.1.0.0/16")
    assert P.parse_target("2001:db8::1/64") == ("cidr", "2001:db8::/64")


@pytest.mark.parametrize(
    "target",
    ["", "  ", "exa mple.com", "under_score.test", "-lead.test", "*", "*.com", "a..b", "x" * 64 + ".test", "1.2.3", 7],
)
def test_bad_targets_are_refused(target: object) -> None:
    with pytest.raises(P.PolicyError):
        P.parse_target(target)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"defaultAction": "maybe"},
        {"defaultAction": "deny", "egress": {"action": "allow"}},
        {"defaultAction": "deny", "egress": [{"action": "permit", "target": "a.test"}]},
        {"defaultAction": "deny", "egress": [{"action": "allow", "target": "a.test", "port": 80}]},
        {"defaultAction": "deny", "ports": []},
    ],
)
def test_bad_policies_are_refused(raw: object) -> None:
    with pytest.raises(P.PolicyError):
        P.parse_policy(raw)


def test_rule_count_is_capped() -> None:
    raw = {"defaultAction": "deny", "egress": rules(*[("allow", f"n{i}.test") for i in range(5)])}
    assert len(P.parse_policy(raw, max_rules=5).rules) == 5
    with pytest.raises(P.PolicyError, match="at most 4"):
        P.parse_policy(raw, max_rules=4)
    with pytest.raises(P.PolicyError):
        P.merge(P.parse_policy(raw, max_rules=5), [P.parse_rule({"action": "deny", "target": "x.test"})], 5)


def test_defaults_follow_the_sdk() -> None:
    assert P.parse_policy(None) == P.ALLOW_ALL and P.parse_policy({}) == P.ALLOW_ALL
    assert P.parse_policy({"egress": rules(("allow", "a.test"))}).default_action == "deny"


def test_first_matching_rule_decides_and_a_wildcard_is_below_its_domain_only() -> None:
    policy = P.parse_policy(
        {"defaultAction": "deny", "egress": rules(("deny", "bad.good.test"), ("allow", "*.good.test"))}
    )
    assert policy.decide("a.good.test") == (1, "allow")
    assert policy.decide("A.Good.Test.") == (1, "allow")
    assert policy.decide("bad.good.test") == (0, "deny")
    assert policy.decide("good.test") == (None, "deny")  # *.x is not x
    assert policy.decide("evilgood.test") == (None, "deny")  # nor a name that only ends like it


def test_the_first_rule_of_a_target_wins() -> None:
    policy = P.parse_policy({"defaultAction": "allow", "egress": rules(("deny", "a.test"), ("allow", "a.test"))})
    assert [r.to_json() for r in policy.rules] == [{"action": "deny", "target": "a.test"}]


def test_merge_puts_incoming_rules_first_and_remove_keeps_the_default() -> None:
    policy = P.parse_policy({"defaultAction": "deny", "egress": rules(("allow", "*.a.test"), ("allow", "b.test"))})
    merged = P.merge(policy, P.parse_rules(rules(("deny", "x.a.test"), ("deny", "b.test"))))
    assert [(r.action, r.target) for r in merged.rules] == [
        ("deny", "x.a.test"),
        ("deny", "b.test"),
        ("allow", "*.a.test"),
    ]
    assert merged.default_action == "deny"
    removed = P.remove(merged, ["b.test", "unknown.test"])
    assert [r.target for r in removed.rules] == ["x.a.test", "*.a.test"] and removed.default_action == "deny"


def test_the_ruleset_replaces_the_table_and_checks_in_rule_order() -> None:
    layout = P.Layout()
    policy = P.parse_policy(
        {"defaultAction": "deny", "egress": rules(("deny", "10.0.0.0/8"), ("allow", "*.good.test"))}
    )
    known = {1: P.Resolved(v4={"203.0.113.10"}, v6={"2001:db8::10"})}
    text = P.ruleset(policy, layout, known)
    # create-then-delete-then-define: one transaction whether the table existed or not
    assert text.startswith(f"table inet {layout.table} {{}}\ndelete table inet {layout.table}\n")
    lines = [line.strip() for line in text.splitlines()]
    output = lines[lines.index("chain output {") :]
    order = [
        "meta mark 0x4f534547 accept",
        'oifname "lo" accept',
        "ct state established,related accept",
        "ip daddr @doh4 goto refuse",
        "meta l4proto { tcp, udp } th dport 853 goto refuse",
        "ip daddr @r0v4 goto refuse",
        "ip daddr @r1v4 accept",
        "ip6 daddr @r1v6 accept",
        "goto refuse",
    ]
    positions = [output.index(line) for line in order]
    assert positions == sorted(positions)
    assert "elements = { 203.0.113.10 }" in text and "elements = { 2001:db8::10 }" in text
    assert f"th dport 53 redirect to :{layout.dns_port}" in text
    assert "8.8.8.8" in text  # DNS over HTTPS resolvers refused whatever the rules say


def test_default_allow_accepts_at_the_end() -> None:
    text = P.ruleset(P.parse_policy({"defaultAction": "allow", "egress": rules(("deny", "bad.test"))}), P.Layout())
    lines = [line.strip() for line in text.splitlines()]
    assert lines[lines.index("chain refuse {") - 2] == "accept"


def test_element_changes_go_to_the_rule_sets_by_family() -> None:
    text = P.element_change(P.Layout(), "add", 3, ["203.0.113.1", "2001:db8::1", "203.0.113.2"])
    assert text == (
        "add element inet opensandbox_egress r3v4 { 203.0.113.1, 203.0.113.2 }\n"
        "add element inet opensandbox_egress r3v6 { 2001:db8::1 }\n"
    )
    assert P.element_change(P.Layout(), "delete", 0, []) == ""
