"""CLI conventions: help with examples, underscore and hyphen names, nnU-Net style multi-value -d."""

import subprocess
import sys

import pytest
from conftest import make_raw_dataset

from diffprobe.cli.app import expand_multi_value_options, main

COMMANDS = ["make_phantoms", "plan_and_preprocess", "pretrain", "sample", "export_model", "install_model", "train",
            "predict", "evaluate", "demo", "tune_timesteps"]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_example(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"diffprobe {name}" in out


@pytest.mark.parametrize("name", COMMANDS)
def test_hyphenated_alias(name, capsys):
    assert main([name.replace("_", "-"), "--help"]) == 0


def test_help_lists_commands_in_pipeline_order(capsys):
    """`diffprobe --help` shows the pipeline first (plan_and_preprocess ... evaluate), then the tools,
    not the import order of the command modules (which put tune_timesteps first)."""
    from diffprobe.cli.app import COMMAND_ORDER, app

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    # a command's row starts right after the box border; its wrapped help lines are indented
    rows = [line[2:].split(" ")[0] for line in out.splitlines() if line.startswith("│ ") and line[2:3] != " "]
    shown = [name for name in rows if name in COMMAND_ORDER]
    assert shown == list(COMMAND_ORDER)
    assert shown[:5] == ["plan_and_preprocess", "pretrain", "train", "predict", "evaluate"]
    # every visible command is placed on purpose: a new one must be added to COMMAND_ORDER
    import typer

    group = typer.main.get_command(app)
    visible = [n for n, c in group.commands.items() if not c.hidden]
    assert sorted(visible) == sorted(COMMAND_ORDER)


def test_expand_multi_value_options():
    assert expand_multi_value_options(["plan_and_preprocess", "-d", "1", "2", "003", "-np", "4"]) == [
        "plan_and_preprocess", "-d", "1", "-d", "2", "-d", "003", "-np", "4"]
    assert expand_multi_value_options(["x", "-d", "1", "--clean"]) == ["x", "-d", "1", "--clean"]


def test_plan_and_preprocess_several_datasets(roots, capsys):
    make_raw_dataset(roots["raw"], dataset_id=5, name="A")
    make_raw_dataset(roots["raw"], dataset_id=6, name="B")
    assert main(["plan_and_preprocess", "-d", "5", "Dataset006_B", "-np", "1"]) == 0
    for name in ("Dataset005_A", "Dataset006_B"):
        assert (roots["preprocessed"] / name / "diffprobe" / "plans.json").is_file()


def test_unknown_dataset_clean_error(roots):
    res = subprocess.run([sys.executable, "-m", "diffprobe", "plan_and_preprocess", "-d", "42"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "no dataset with id 042" in res.stderr and "fix:" in res.stderr and "Traceback" not in res.stderr


def test_bad_option_exit_code(roots):
    assert main(["plan_and_preprocess", "--no-such-option"]) == 2


def test_error_messages_are_printed_verbatim(capfd) -> None:
    """Bracketed text in a message (paths, ranges) is not swallowed as rich markup."""
    from diffprobe.cli.app import app

    @app.command("_raise_bracketed", hidden=True)
    def _raise() -> None:
        from diffprobe.errors import DiffprobeError

        raise DiffprobeError("value must be in [low, high]", "/data/[weird]/plans.json", "use [0, 1]")

    try:
        assert main(["_raise_bracketed"]) == 1
        err = capfd.readouterr().err
        assert "[low, high]" in err and "/data/[weird]/plans.json" in err and "use [0, 1]" in err
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "_raise_bracketed"]


@pytest.mark.parametrize(("error", "code", "needle"), [
    (EOFError("Ran out of input"), 1, "error: EOFError: Ran out of input"),  # a bug: click calls it an abort
    (KeyboardInterrupt(), 130, "interrupted: finished outputs are kept"),
])
def test_eof_error_is_an_error_not_an_interruption(error, code, needle, capfd) -> None:
    from diffprobe.cli.app import app

    @app.command("_raise_eof", hidden=True)
    def _raise() -> None:
        raise error

    try:
        assert main(["_raise_eof"]) == code
        out = capfd.readouterr()
        assert needle in out.out + out.err
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "_raise_eof"]


@pytest.mark.parametrize("argv,option", [
    (["train", "-d", "1", "-f", "0", "1"], "-f"),
    (["train", "-d", "1", "2", "-f", "0"], "-d"),
    (["ablate", "controls", "-d", "1", "-f", "0", "-f", "1"], "-f"),
])
def test_single_value_option_given_twice_is_refused(argv, option, roots, capfd) -> None:
    """`train -f 0 1` used to train fold 1 only, silently (click keeps the last value)."""
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert f"{option} takes one value, got 2" in err and "give" in err and "Traceback" not in err


def test_predict_fold_spelled_with_a_leading_zero(roots, monkeypatch) -> None:
    """`predict -f 01` selects fold_1, as `train -f 01` trains into fold_1 (was: 'not trained')."""
    from diffprobe import paths
    from diffprobe.predict.inputs import select_model

    (roots["raw"] / "Dataset001_X").mkdir()
    fold = paths.results_root() / "Dataset001_X" / paths.SUBFOLDER / "m__fpn" / "fold_1"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pt").write_bytes(b"x")
    (fold / "probe.json").write_text("{}")
    assert select_model(1, None, ["01", "1"]) == [fold]
    with pytest.raises(Exception, match="fold\\(s\\) 2 of m__fpn are not trained"):
        select_model(1, None, ["02"])
