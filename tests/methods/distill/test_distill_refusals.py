"""Every distill mistake is one line on stderr, exit code 2, before anything is written: no teacher, a teacher with
another vocabulary, a trained prompt, packed rows, out-of-range settings; and `alignkit format` shows what trains."""

import pytest
from distill_support import install_entry_point, save_teacher

from helpers import refused


@pytest.fixture(autouse=True)
def installed(tmp_path_factory, monkeypatch):
    monkeypatch.syspath_prepend(str(install_entry_point(tmp_path_factory.mktemp("site"))))
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit,alignkit-distill")


def test_no_teacher(tmp_path):
    line = refused("run", "--method", "distill", "data.train=builtin:sort-distill", "model.name_or_path=builtin:tiny",
                   "model.ref_name_or_path=null", f"train.output_dir={tmp_path / 'out'}", written=tmp_path / "out")
    assert "model.ref_name_or_path" in line and "teacher" in line


def test_teacher_with_another_vocabulary(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", vocab_size=500)
    line = refused("run", "--method", "distill", f"model.ref_name_or_path={teacher}",
                   f"train.output_dir={tmp_path / 'out'}", written=tmp_path / "out")
    assert "model.ref_name_or_path" in line and "500" in line and "vocabulary" in line


@pytest.mark.parametrize("setting, key", [("method.completion_only_loss=false", "completion_only_loss"),
                                          ("method.packing=true", "packing"), ("method.beta=2", "beta"),
                                          ("method.lmbda=1.5", "lmbda")])
def test_settings(tmp_path, setting, key):
    teacher = save_teacher(tmp_path / "teacher")
    line = refused("run", "--method", "distill", f"model.ref_name_or_path={teacher}", setting,
                   f"train.output_dir={tmp_path / 'out'}", written=tmp_path / "out")
    assert key in line


def test_format_shows_the_completion_trained(tmp_path):
    from click.testing import CliRunner

    from alignkit.cli.commands import cli

    teacher = save_teacher(tmp_path / "teacher")
    result = CliRunner().invoke(cli, ["-q", "format", "--method", "distill", f"model.ref_name_or_path={teacher}"])
    assert result.exit_code == 0, result.output
    assert "sort: 6 0 4 8 7 6 =[[ 0]][[ 4]][[ 6]][[ 6]][[ 7]][[ 8]][[</s>]]" in result.output  # the prompt untrained
