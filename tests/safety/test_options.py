"""Every numeric option of every subcommand is finite and in range, checked when it is parsed, with the same
limit the library enforces later: nan, inf, values just outside the limit and absurdly large ones give exit 2
and one line naming the option."""

from __future__ import annotations

import argparse
import math

import pytest

from latentmoe.cli import build_parser
from latentmoe.limits import Limit


def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(subcommand words, action) for every option of every (nested) subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*prefix, name))
        elif action.option_strings:
            yield prefix, action


def numeric_options():
    seen = []
    for words, action in walk(build_parser()):
        if action.type in (int, float):
            raise AssertionError(f"{' '.join(words)} {action.option_strings[0]}: a bare int/float type has no limit")
        limit = getattr(action.type, "limit", None)
        if isinstance(limit, Limit):
            seen.append((words, action.option_strings[-1], limit))
    return seen


OPTIONS = numeric_options()


def bad_values(limit: Limit) -> list[str]:
    values = ["nan", "inf", "-inf", "1e400", "abc"]
    if limit.low is not None:
        values.append(repr(limit.low - 1) if limit.integer else ("0" if limit.low_open and limit.low == 0 else
                                                                 repr(limit.low - 1e-3 * max(1.0, abs(limit.low)))))
    if limit.high is not None:
        values.append(str(int(limit.high) + 1) if limit.integer else repr(limit.high * 10 + 1))
    if limit.integer:
        values.append("1.5")
    return values


CASES = [(words, flag, value) for words, flag, limit in OPTIONS for value in bad_values(limit)]


def test_every_subcommand_with_numbers_was_found():
    commands = {words for words, _, _ in OPTIONS}
    assert {("train",), ("demo",), ("generate",), ("plan",), ("plan", "decode-limit"), ("plan", "network"),
            ("plan", "all-to-all"), ("prepare-data",)} <= commands
    assert len(CASES) > 200


def required_args(words: tuple[str, ...]) -> list[str]:
    return {"train": ["--out", "x"], "generate": ["--checkpoint", "x", "--prompt", "a"],
            "prepare-data": ["in", "--out", "x"]}.get(words[0], [])


@pytest.mark.parametrize("words, flag, value", CASES, ids=[f"{' '.join(w)} {f} {v}" for w, f, v in CASES])
def test_a_bad_number_is_exit_2_and_one_line_naming_the_option(words, flag, value, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args([*words, *required_args(words), f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert f"argument {flag}" in err[0] and "error: " in err[0]


def test_the_command_line_and_the_library_state_the_same_limit():
    """--lr inf and TrainConfig(lr=inf) fail with the same words (one limit per option)."""
    from latentmoe.config import ConfigError
    from latentmoe.train import TrainConfig

    for flag, field, value in (("--lr", "lr", math.inf), ("--lr", "lr", 1e30), ("--bias-gamma", "bias_gamma",
                               math.nan), ("--seq-len", "seq_len", 1), ("--balance-alpha", "balance_alpha", math.inf)):
        limit = next(lim for words, f, lim in OPTIONS if words == ("train",) and f == flag)
        with pytest.raises(ConfigError) as info:
            TrainConfig(**{field: value}).validate()
        assert str(info.value) == f"{field} {limit.problem(value)}"
