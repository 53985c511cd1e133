"""The declared RBAC rules cover what kopf's managed webhook does, limited to the configured name."""

from __future__ import annotations

from kopf._cogs.structs import references
from rlhf_operator import rbac


def _grants(rules):
    return {(g, r, v, tuple(rule.get("resourceNames") or ()))
            for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_webhook_rules_cover_both_configurations_kopf_manages():
    rules = rbac.webhook_rules("x.rlhf.io")
    grants = _grants(rules)
    # kopf runs one configuration manager per selector: create (any name), then patch by name.
    for selector in (references.VALIDATING_WEBHOOK, references.MUTATING_WEBHOOK):
        assert (selector.group, selector.any_name, "create", ()) in grants, selector
        assert (selector.group, selector.any_name, "patch", ("x.rlhf.io",)) in grants, selector
    # Nothing else, and nothing beyond patch on other objects.
    assert {v for *_, v, names in grants if not names} == {"create"}
    assert all(rule["why"] for rule in rules)


def test_default_webhook_rules_name_the_default_configuration():
    from rlhf_operator.settings import Settings

    names = {n for rule in rbac.WEBHOOK_RULES for n in rule.get("resourceNames", [])}
    assert names == {Settings.webhook_config_name}
