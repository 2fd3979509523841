"""Hostile inputs to `bitlm prepare` and `bitlm train` options: each a one-line error naming the path or option, never a traceback."""

from __future__ import annotations

from click.testing import CliRunner

from bitlm.cli import main


def test_prepare_into_a_path_below_a_file_names_the_path(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("to be or not to be, that is the question\n" * 200)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["prepare", str(source), "--out", str(blocker / "out"),
                                       "--window-bytes", "64", "--quiet"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and str(blocker) in errors[0]


def test_train_with_a_device_this_machine_lacks_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--local", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                       "--device", "bogus"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--device" in result.output and "'bogus' is not a device" in result.output


def test_train_with_zero_diffusion_steps_is_refused_naming_the_option(tmp_path):
    result = CliRunner().invoke(main, ["train", "--local", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                       "--diffusion", "--diffusion-steps", "0"])
    assert result.exit_code == 2 and "--diffusion-steps" in result.output
