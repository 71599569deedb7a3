"""The demo's simulated users: how they judge an answer."""

import pytest


@pytest.mark.parametrize(
    ("reference", "key", "answer", "satisfied"),
    [
        ("The work pool is harbor-cpu.", "harbor-cpu", "Retrains run in harbor-CPU.", True),
        ("The work pool is harbor-cpu.", "harbor-cpu", "The work pool is harbor.", False),
        ("Run `make test` from the root.", None, "Use make test in the root.", True),
        ("Run `make test` from the root.", None, "Bake the bread for an hour.", False),
        ("Run `make test` from the root.", None, "", False),
    ],
)
def test_simulated_users_judge_answers_by_the_documented_rule(
    reference, key, answer, satisfied
) -> None:
    from scripts.traffic import Question
    from scripts.traffic import satisfied as judge

    assert judge(Question("q", reference, key), answer) is satisfied
