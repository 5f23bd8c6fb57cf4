"""alignkit deletes only what it wrote (issue 20, "Data loss" 1-7): a manifest in each run folder lists what alignkit
created there; only its entries are removed, rotated or overwritten; a checkpoint folder belongs to one run."""

import hashlib
import os
from pathlib import Path

import pytest
import yaml

import alignkit
from alignkit import config as config_module
from helpers import fast, write_jsonl

MANIFEST = ".alignkit-manifest.json"
ROWS = [{"prompt": f"sort {i} 3 1", "chosen": "1 3", "rejected": "3 1"} for i in range(8)]


def snapshot(folder: Path) -> dict:
    """Every file and link under folder (links not followed) -> its bytes' hash or its target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def project(folder: Path) -> Path:
    """A user's project folder: their own config, data, notes and sources."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("print('mine')\n")
    (folder / "notes.txt").write_text("years of work\n")
    write_jsonl(folder / "train.jsonl", ROWS)
    return folder


def refused(match: str, *args, **kwargs):
    with pytest.raises(alignkit.ConfigError, match=match) as e:
        alignkit.run(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- 1. a user's project folder as output_dir ------------------------------------------------------

def test_1_a_project_folder_is_refused_naming_its_files_and_nothing_is_written(pm, tmp_path):
    out = project(tmp_path / "out")
    (out / "config.yaml").write_text(yaml.safe_dump({"train": {"learning_rate": 1.0e-4}}))
    before = snapshot(out)
    message = refused("holds files alignkit did not write", "orpo", fast(tmp_path, max_steps=1), plugins=pm)
    assert "notes.txt" in message and "src" in message and "train.overwrite_output_dir=true" in message
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", "notes.txt",
                                                                                        "src", "train.jsonl"])
    # overwrite keeps foreign files, but a config.yaml of the user's stands where alignkit writes its own
    refused("config.yaml", "orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True), plugins=pm)
    assert snapshot(out) == before and not (out / ".alignkit.lock").exists() and not (out / MANIFEST).exists()


def test_1_overwrite_writes_beside_foreign_files_and_keeps_them(pm, tmp_path):
    out = project(tmp_path / "out")
    before = snapshot(out)
    alignkit.run("orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True), plugins=pm)
    after = snapshot(out)
    assert {k: after[k] for k in before} == before and (out / "model.safetensors").is_file()
    alignkit.run("orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True), plugins=pm)  # and again
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


# ---- 2. the -c config file inside output_dir ---------------------------------------------------------

def test_2_a_config_file_where_the_run_writes_its_config_is_refused(pm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(fast(tmp_path, max_steps=1)))
    before = config.read_bytes()
    refused(r"-c: .*config.yaml lies in train.output_dir", "orpo", str(config), plugins=pm)
    assert config.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    from click.testing import CliRunner

    from alignkit.cli.commands import cli

    result = CliRunner().invoke(cli, ["run", "--method", "orpo", "-c", str(config)])
    assert result.exit_code == 2 and result.stderr.startswith(f"alignkit: error: -c: {config} lies in train.output_dir")
    assert result.stderr.count("\n") == 1
    assert config.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["config.yaml"]


# ---- 3. data.train inside output_dir with overwrite --------------------------------------------------

def test_3_training_data_inside_the_folder_survives_overwrite(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=1, save_steps=1), plugins=pm)
    data = Path(write_jsonl(out / "pairs.jsonl", ROWS))
    before = data.read_bytes()
    cfg = fast(tmp_path, max_steps=1, overwrite_output_dir=True)
    cfg["data"] = {"train": str(data), "eval": str(data)}
    alignkit.run("orpo", cfg, plugins=pm)
    assert data.read_bytes() == before
    alignkit.run("orpo", cfg, plugins=pm)  # read again: still there
    assert data.read_bytes() == before


def test_3_data_that_alignkit_itself_wrote_is_refused_as_training_data_of_a_run_that_removes_it(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm)
    cfg = fast(tmp_path, max_steps=1, overwrite_output_dir=True)
    cfg["data"] = {"train": str(out / "metrics.jsonl")}
    before = snapshot(out)
    refused("data.train: .*metrics.jsonl is a file this run would remove", "orpo", cfg, plugins=pm)
    assert snapshot(out) == before


# ---- 4. overwrite removes only alignkit's own files --------------------------------------------------

def test_4_overwrite_keeps_a_file_the_user_put_in_the_run_folder(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    (out / "my-notes.md").write_text("what I saw\n")
    (out / "checkpoints" / "keep.txt").write_text("mine\n")
    refused("my-notes.md", "orpo", fast(tmp_path, max_steps=1), plugins=pm)
    alignkit.run("orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True), plugins=pm)
    assert (out / "my-notes.md").read_text() == "what I saw\n"
    assert (out / "checkpoints" / "keep.txt").read_text() == "mine\n"
    assert not (out / "checkpoints" / "checkpoint-1").exists()
    described = config_module.TrainConfig.model_fields["overwrite_output_dir"].description
    assert "removes only" in described and "keeps every other file" in described


# ---- 5. two runs, one checkpoint folder --------------------------------------------------------------

def test_5_a_second_run_given_the_same_checkpoint_dir_is_refused(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path / "a", max_steps=3, save_steps=1), plugins=pm)
    a = tmp_path / "a" / "out"
    before = snapshot(a)
    refused("checkpoint_dir: .* belongs to the run in .*a/out", "orpo",
            fast(tmp_path / "b", max_steps=3, save_steps=1, save_total_limit=1,
                 checkpoint_dir=str(Path("..") / ".." / "a" / "out" / "checkpoints")), plugins=pm)
    assert snapshot(a) == before and not (tmp_path / "b").exists()
    shared = tmp_path / "shared"  # an absolute folder outside both runs: the first run owns it
    alignkit.run("orpo", fast(tmp_path / "c", max_steps=3, save_steps=1, checkpoint_dir=str(shared)), plugins=pm)
    kept = snapshot(shared)
    assert any(k.startswith("checkpoint-1/") for k in kept)
    refused("checkpoint_dir: .* belongs to the run in .*c/out", "orpo",
            fast(tmp_path / "d", max_steps=2, save_steps=1, save_total_limit=1, checkpoint_dir=str(shared)), plugins=pm)
    assert snapshot(shared) == kept and not (tmp_path / "d").exists()
    # the owner itself resumes and rotates there
    alignkit.run("orpo", fast(tmp_path / "c", max_steps=3, save_steps=1, save_total_limit=1, checkpoint_dir=str(shared),
                              resume_from_checkpoint="auto"), plugins=pm)


# ---- 6. an output_dir inside a run's checkpoint folder ---------------------------------------------

@pytest.mark.parametrize("step", [2, 20])
def test_6_an_output_dir_inside_a_checkpoint_folder_is_refused(pm, tmp_path, step):
    alignkit.run("orpo", fast(tmp_path / "a", max_steps=3, save_steps=1), plugins=pm)
    a = tmp_path / "a" / "out"
    before = snapshot(a)
    nested = a / "checkpoints" / f"checkpoint-{step}"
    refused("train.output_dir: .* lies inside the checkpoint folder", "orpo",
            fast(tmp_path, max_steps=1, output_dir=str(nested)), plugins=pm)
    assert snapshot(a) == before and nested.exists() == (step == 2)


def test_6_an_output_dir_inside_a_checkpoint_folder_of_dot_is_refused(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path / "a", max_steps=2, save_steps=1, checkpoint_dir="."), plugins=pm)
    a = tmp_path / "a" / "out"
    before = snapshot(a)
    refused("train.output_dir: .* lies inside the checkpoint folder", "orpo",
            fast(tmp_path, max_steps=1, output_dir=str(a / "checkpoint-7")), plugins=pm)
    assert snapshot(a) == before


# ---- 7. plots/ a symbolic link -----------------------------------------------------------------------

def test_7_a_resumed_run_writes_no_plot_through_a_link(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1, plots=True), plugins=pm)
    assert (out / "plots" / "overview.png").is_file()
    user = tmp_path / "photos"
    user.mkdir()
    (user / "overview.png").write_bytes(b"my holiday")
    (user / "loss.png").write_bytes(b"my cat")
    for p in (out / "plots").iterdir():
        p.unlink()
    (out / "plots").rmdir()
    (out / "plots").symlink_to(user)
    before = snapshot(user)
    refused(r"plots is a symbolic link", "orpo",
            fast(tmp_path, max_steps=2, save_steps=1, plots=True, resume_from_checkpoint="auto"), plugins=pm)
    assert snapshot(user) == before


# ---- acceptance: every command that cleans, rotates or overwrites leaves foreign files byte-identical ----

@pytest.mark.slow  # eight runs and two evaluations
def test_every_command_that_cleans_rotates_or_overwrites_keeps_every_foreign_file(pm, tmp_path):
    from click.testing import CliRunner

    from alignkit.cli.commands import cli
    from alignkit.engine.manifest import Manifest

    out, outside = project(tmp_path / "out"), tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_text("outside the run\n")
    (out / "linked").symlink_to(outside)
    (out / "deep" / "er").mkdir(parents=True)
    (out / "deep" / "er" / "x.bin").write_bytes(bytes(range(256)))

    def foreign_intact():
        now = snapshot(out)
        assert {k: now.get(k) for k in mine} == mine and snapshot(outside) == theirs

    mine, theirs = snapshot(out), snapshot(outside)
    cfg = dict(max_steps=3, save_steps=1, save_total_limit=1, plots=True)
    refused("holds files alignkit did not write", "orpo", fast(tmp_path, **cfg), plugins=pm)  # fresh run
    foreign_intact()
    alignkit.run("orpo", fast(tmp_path, **cfg, overwrite_output_dir=True), plugins=pm)  # overwrite + rotation
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    foreign_intact()
    for folder in ("checkpoints", "plots"):  # the user's files inside alignkit's own folders
        (out / folder / "mine.txt").write_text(f"mine in {folder}\n")
    mine.update({k: v for k, v in snapshot(out).items() if k.endswith("/mine.txt")})
    alignkit.run("orpo", fast(tmp_path, **cfg, resume_from_checkpoint="auto"), plugins=pm)  # resume, plots again
    foreign_intact()
    alignkit.run("orpo", fast(tmp_path, **cfg, overwrite_output_dir=True), plugins=pm)  # overwrite again
    foreign_intact()
    # a crashed run's leftovers (killed during its first save): started over
    Manifest.read(out).clear(keep=("config.yaml", "metrics.jsonl"))
    assert not (out / "model.safetensors").exists() and (out / "checkpoints" / "mine.txt").is_file()
    Manifest.read(out).add("checkpoints/.tmp-checkpoint-9", "tree")
    (out / "checkpoints" / ".tmp-checkpoint-9").mkdir()
    (out / "checkpoints" / ".tmp-checkpoint-9" / "model.safetensors").write_bytes(b"torn")
    alignkit.run("orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True, resume_from_checkpoint="auto"),
                 plugins=pm)
    assert not (out / "checkpoints" / ".tmp-checkpoint-9").exists()
    foreign_intact()
    # alignkit eval writes eval_results.json beside the model, twice (the second replaces its own file)
    for _ in range(2):
        alignkit.evaluate("orpo", fast(tmp_path), plugins=pm, **{"model.name_or_path": str(out)})
    assert (out / "eval_results.json").is_file()
    foreign_intact()
    # alignkit plot: into the run's plots/, then refused through the link and over a user's chart elsewhere
    result = CliRunner().invoke(cli, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    foreign_intact()
    result = CliRunner().invoke(cli, ["plot", str(out), "-o", str(out / "linked")])
    assert result.exit_code == 2 and "is a symbolic link" in result.output
    (outside / "overview.png").write_bytes(b"the user's chart")
    theirs = snapshot(outside)
    result = CliRunner().invoke(cli, ["plot", str(out), "-o", str(outside)])
    assert result.exit_code == 2 and "overview.png that alignkit did not write" in result.output
    foreign_intact()


# ---- the rule's edges ------------------------------------------------------------------------------------

def test_a_folder_of_an_older_alignkit_is_alignkits_only_by_known_names_beside_its_config(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    (out / MANIFEST).unlink()  # as an alignkit older than the manifest left it
    (out / "notes.txt").write_text("mine\n")
    refused(r"holds files alignkit did not write \(notes.txt\)", "orpo", fast(tmp_path, max_steps=1), plugins=pm)
    alignkit.run("orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True), plugins=pm)
    assert (out / "notes.txt").read_text() == "mine\n" and not (out / "checkpoints" / "checkpoint-1").exists()


def test_a_refusal_after_the_lock_leaves_no_lock_file_in_the_users_folder(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path / "b", max_steps=2, save_steps=1), plugins=pm)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    ckpt = tmp_path / "b" / "out" / "checkpoints" / "checkpoint-1"
    refused("was made with other settings", "orpo", fast(tmp_path, max_steps=2, output_dir=str(user),
                                                          learning_rate=1.0, overwrite_output_dir=True,
                                                          resume_from_checkpoint=str(ckpt)), plugins=pm)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_the_config_alignkit_wrote_may_be_resumed_with_but_not_removed_by_a_fresh_run(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    config = out / "config.yaml"
    result = alignkit.run("orpo", str(config), plugins=pm, **{"train.resume_from_checkpoint": "auto"})
    assert result.global_step == 2 and config.is_file()
    refused(r"-c: .*config.yaml is a file this run would remove", "orpo", str(config), plugins=pm,
            **{"train.overwrite_output_dir": True, "train.resume_from_checkpoint": None})
    assert config.is_file()


def test_the_tracker_folder_is_recorded_and_a_users_folder_of_that_name_is_refused(pm, tmp_path):
    import json

    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=1, report_to=["tensorboard"], run_name="tb"), plugins=pm)
    assert any((out / "tb").rglob("events.out.tfevents.*"))
    assert json.loads((out / MANIFEST).read_text())["entries"]["tb"] == "tree"
    alignkit.run("orpo", fast(tmp_path, max_steps=1, overwrite_output_dir=True), plugins=pm)
    assert not (out / "tb").exists()
    (out / "tb").mkdir()
    (out / "tb" / "mine.txt").write_text("mine\n")
    refused("holds tb of yours where alignkit writes its own", "orpo",
            fast(tmp_path, max_steps=1, report_to=["tensorboard"], run_name="tb", overwrite_output_dir=True),
            plugins=pm)
    assert (out / "tb" / "mine.txt").read_text() == "mine\n"


def test_a_finished_run_is_refused_before_any_data_is_tokenized(pm, tmp_path, monkeypatch):
    from alignkit.engine.rundata import RunData

    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm)
    before = snapshot(out)

    def tokenized(*args, **kwargs):
        raise AssertionError("the data was tokenized before the refusal")

    monkeypatch.setattr(RunData, "formatted", tokenized)
    refused("is not empty and holds an earlier run of this same config", "orpo", fast(tmp_path, max_steps=1),
            plugins=pm)
    assert snapshot(out) == before


def test_the_root_folder_is_refused_and_left_without_a_lock_file(pm, tmp_path):
    assert not Path("/.alignkit.lock").exists()
    refused("holds files alignkit did not write", "orpo", fast(tmp_path, max_steps=1, output_dir="/"), plugins=pm)
    assert not Path("/.alignkit.lock").exists() and not Path("/" + MANIFEST).exists()


def test_the_trl_style_trainers_own_files_are_recorded_so_a_second_trainer_may_start_over(tok, tmp_path):
    import datasets

    from alignkit.testing import tiny_model
    from alignkit_orpo import ORPOConfig, ORPOTrainer

    def trainer():
        args = ORPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none",
                          disable_tqdm=True, max_steps=1, save_steps=1)
        return ORPOTrainer(model=tiny_model(seed=1), args=args, processing_class=tok,
                           train_dataset=datasets.Dataset.from_list(ROWS))

    first = trainer()
    first.train()
    first.create_model_card()
    first.save_model()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    trainer().train()  # starts over (the trainer overwrites): README.md and training_args.bin are alignkit's
    assert not (tmp_path / "out" / "training_args.bin").exists() and (tmp_path / "out" / "notes.txt").is_file()
