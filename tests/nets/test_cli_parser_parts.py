"""Each subcommand's part of ``build_parser`` on its own: its arguments, defaults, handler."""

from __future__ import annotations

import argparse

import pytest

from nets import cli

MINIMAL = {
    # run-defining flags default to None: with --resume a flag left out takes the run's value
    "train": (
        ["--dir", "run"],
        {"epochs": None, "track_curvature": None, "handler": cli._cmd_train},
    ),
    "spectrum": (["--checkpoint", "c.pt"], {"iters": 20, "handler": cli._cmd_spectrum}),
    "stats": (["c.pt"], {"batch_size": 128, "handler": cli._cmd_stats}),
    "landscape": (["--checkpoint", "c.pt"], {"n_points": 21, "handler": cli._cmd_landscape}),
    "compare": (
        ["--checkpoint", "c.pt"],
        {
            "approx": "kfac,ekfac,diag-ggn,diag-mc,low-rank-20",
            "curvature": "ggn",
            "handler": cli._cmd_compare,
        },
    ),
    "plot": (["tracking", "run"], {"inputs": ["run"], "handler": cli._cmd_plot}),
    "demo": ([], {"out": "results", "handler": cli._cmd_demo}),
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_each_subcommand_part_adds_its_parser(name: str) -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="command", required=True)
    getattr(cli, f"_add_{name}_parser")(sub, argparse.HelpFormatter)
    assert list(sub.choices) == [name]
    argv, expected = MINIMAL[name]
    args = parser.parse_args([name, *argv])
    for key, value in expected.items():
        assert getattr(args, key) == value, key


def test_build_parser_composes_the_seven_parts() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [
        "train",
        "spectrum",
        "stats",
        "landscape",
        "compare",
        "plot",
        "demo",
    ]
    args = parser.parse_args(["train", "--dir", "r", "--track-curvature", "every=5"])
    assert cli.track_options(args.track_curvature) == {"every": 5}
