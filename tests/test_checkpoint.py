"""Checkpoint bookkeeping: what counts as a checkpoint, which is latest, what rotation keeps, what a resume refuses."""

import json
import os

import pytest

from imgft import checkpoint
from imgft.args import field_defaults
from imgft.errors import UserError


class MainProcess:
    is_main_process = True


def make_checkpoint(root, name, completed_steps, complete=True, mtime=None):
    path = root / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"completed_steps": completed_steps}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_latest_is_the_newest_complete_checkpoint_by_step_not_by_time(tmp_path):
    make_checkpoint(tmp_path, "step_30", 30, mtime=1_000)
    make_checkpoint(tmp_path, "epoch_1", 16, mtime=9_000)  # written later, but an earlier step
    make_checkpoint(tmp_path, "step_40", 40, complete=False)  # killed before its state file was written
    make_checkpoint(tmp_path, ".tmp-step_50", 50)  # killed before the rename
    make_checkpoint(tmp_path, "notes", 99)  # not a checkpoint name
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch_1", "step_30"]
    assert checkpoint.choose_checkpoint("latest", tmp_path) == str(tmp_path / "step_30")


def test_latest_without_checkpoints_means_a_fresh_start_and_a_bad_path_is_refused(tmp_path):
    assert checkpoint.choose_checkpoint("latest", tmp_path / "missing") is None
    assert checkpoint.choose_checkpoint(None, tmp_path) is None
    with pytest.raises(UserError, match="step_3 does not exist"):
        checkpoint.choose_checkpoint(str(tmp_path / "step_3"), tmp_path)
    (tmp_path / "step_4").mkdir()
    with pytest.raises(UserError, match="not an imgft checkpoint"):
        checkpoint.choose_checkpoint(str(tmp_path / "step_4"), tmp_path)


def test_rotation_keeps_the_ones_it_is_told_to(tmp_path):
    for step in (5, 10, 15, 20, 25):
        make_checkpoint(tmp_path, f"step_{step}", step)
    keep = [str(tmp_path / "step_25"), str(tmp_path / "step_5")]  # just saved, resumed from
    removed = checkpoint.delete_oldest_checkpoints(MainProcess(), tmp_path, 2, keep=keep)
    assert sorted(os.path.basename(p) for p in removed) == ["step_10", "step_15", "step_20"]
    assert sorted(os.listdir(tmp_path)) == ["step_25", "step_5"]
    # A limit of 1 still never deletes a protected one.
    assert checkpoint.delete_oldest_checkpoints(MainProcess(), tmp_path, 1, keep=keep) == []
    assert checkpoint.delete_oldest_checkpoints(MainProcess(), tmp_path, None) == []


def test_a_finished_runs_length_counts_epochs_only_where_no_max_train_steps_overrides_them():
    changes = checkpoint.training_length_changes

    assert changes({"num_train_epochs": 1}, {"num_train_epochs": 3}) == ["num_train_epochs: 1 -> 3"]
    assert changes({"max_train_steps": 8}, {"max_train_steps": 8, "num_train_epochs": 9}) == []
    assert changes({"max_train_steps": 8}, {}) == ["max_train_steps: 8 -> None"]  # 5 epochs both


def test_compare_runs_separates_harmless_changes_from_ones_that_change_training():
    saved = {"config": {"learning_rate": 1e-3, "num_workers": 0, "logging_steps": 10}, "num_processes": 2}
    current = {"config": {"learning_rate": 2e-3, "num_workers": 4, "logging_steps": 10}, "num_processes": 1}
    unsafe, safe = checkpoint.compare_runs(saved, current)
    assert unsafe == ["learning_rate: 0.001 -> 0.002", "num_processes: 2 -> 1"]
    assert safe == ["num_workers: 0 -> 4"]
    assert checkpoint.compare_runs(saved, saved) == ([], [])


def test_resume_refuses_a_changed_learning_rate_and_accepts_more_workers(
    train, tmp_path, colors_data, tiny_vit, caplog
):
    out = tmp_path / "out"
    common = ["--train_dir", colors_data / "train", "--validation_dir", colors_data / "validation"]
    common += ["--model_name_or_path", tiny_vit, "--ignore_mismatched_sizes", "--output_dir", out]
    common += ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    train(common)
    (out / "all_results.json").unlink()  # as if killed after step 4's checkpoint
    metrics_before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"learning_rate: 0.002 -> 0.01"):
        train(common + ["--resume_from_checkpoint", "latest", "--learning_rate", "1e-2"])
    assert (out / "metrics.jsonl").read_text() == metrics_before  # nothing written
    with pytest.raises(UserError, match=r"per_device_train_batch_size: 32 -> 8"):
        train(common + ["--resume_from_checkpoint", "latest", "--per_device_train_batch_size", "8"])
    train(common + ["--resume_from_checkpoint", "latest", "--num_workers", "1"])
    assert "num_workers: None -> 1" in caplog.text
    assert (out / "all_results.json").is_file()


def test_finished_run_with_other_settings_is_not_silently_kept(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    common = ["--train_dir", colors_data / "train", "--validation_dir", colors_data / "validation"]
    common += ["--model_name_or_path", tiny_vit, "--ignore_mismatched_sizes", "--output_dir", out]
    common += ["--max_train_steps", "2"]
    train(common)
    with pytest.raises(UserError, match="finished run with other settings"):
        train(common + ["--resume_from_checkpoint", "latest", "--seed", "7"])


def test_a_flag_added_after_the_checkpoint_counts_as_its_default():
    from imgft.args import field_defaults

    now = field_defaults()
    saved = {key: value for key, value in now.items() if key != "learning_rate"}  # an older imgft's config
    assert checkpoint.compare_runs({"config": saved}, {"config": now}) == ([], [])
    unsafe, _ = checkpoint.compare_runs({"config": saved}, {"config": {**now, "learning_rate": 1.0}})
    assert unsafe == [f"learning_rate: {now['learning_rate']!r} -> 1.0"]


def test_a_changed_schedule_length_is_named_by_the_flag_that_changed_it():
    saved = {"config": {"num_train_epochs": 2}, "max_train_steps": 26}
    unsafe, _ = checkpoint.compare_runs(saved, {"config": {"num_train_epochs": 3}, "max_train_steps": 39})
    assert unsafe == ["num_train_epochs: 2 -> 3 (26 -> 39 optimizer steps)"]
    unsafe, _ = checkpoint.compare_runs(
        saved, {"config": {"num_train_epochs": 2, "max_train_steps": 30}, "max_train_steps": 30}
    )
    assert unsafe == ["max_train_steps: None -> 30 (26 -> 30 optimizer steps)"]
    # Where another change, named on its own, changes the steps an epoch takes.
    unsafe, _ = checkpoint.compare_runs(
        saved, {"config": {"num_train_epochs": 2, "per_device_train_batch_size": 64}, "max_train_steps": 13}
    )
    assert unsafe == ["per_device_train_batch_size: 32 -> 64", "optimizer steps: 26 -> 13"]


def test_flags_that_change_the_evaluations_are_refused_with_the_reason():
    # The evaluation batch size changes eval_loss in its last digits; evaluations pick the best model, stop
    # early and choose EMA or raw weights, so a resume that changes them would not be exact.
    for flag, value in (("per_device_eval_batch_size", 64), ("max_eval_samples", 10)):
        unsafe, safe = checkpoint.compare_runs({"config": {}}, {"config": {flag: value}})
        assert safe == []
        assert unsafe == [
            f"{flag}: {field_defaults()[flag]!r} -> {value!r} (it changes the evaluations, which pick the best model "
            "and stop early)"
        ]


def test_image_size_is_compared_by_the_processor_it_resolves_to_where_both_runs_recorded_it():
    size_16 = {"do_resize": True, "size": {"height": 16, "width": 16}}
    size_32 = {"do_resize": True, "size": {"height": 32, "width": 32}}
    saved = {"config": {"image_size": None}, "image_processor": size_16}
    assert checkpoint.compare_runs(saved, {"config": {"image_size": 16}, "image_processor": size_16}) == ([], [])
    unsafe, _ = checkpoint.compare_runs(saved, {"config": {"image_size": 32}, "image_processor": size_32})
    assert unsafe == ["image_size: None -> 32"]
    # The same flags, but the model's processor file was edited since.
    unsafe, _ = checkpoint.compare_runs(saved, {"config": {"image_size": None}, "image_processor": size_32})
    assert unsafe == ["image processor: size: {'height': 16, 'width': 16} -> {'height': 32, 'width': 32}"]
    # An entry that another version of transformers saves, and this one does not, is not a change.
    assert checkpoint.compare_runs(saved, {"config": {}, "image_processor": {**size_16, "new_entry": 1}}) == ([], [])
    # A checkpoint from before imgft recorded the processor: the flag as typed is all there is to compare.
    unsafe, _ = checkpoint.compare_runs({"config": {}}, {"config": {"image_size": 16}, "image_processor": size_16})
    assert unsafe == ["image_size: None -> 16"]


def test_a_resume_with_image_size_equal_to_the_processors_is_the_same_run(train, tmp_path, colors_data, tiny_vit):
    out = tmp_path / "out"
    common = ["--train_dir", colors_data / "train", "--validation_dir", colors_data / "validation"]
    common += ["--model_name_or_path", tiny_vit, "--ignore_mismatched_sizes", "--output_dir", out]
    common += ["--max_train_steps", "2", "--checkpointing_steps", "2"]
    train(common)
    (out / "all_results.json").unlink()  # as if killed after step 2's checkpoint
    train(common + ["--resume_from_checkpoint", "latest", "--image_size", "16"])
    assert (out / "all_results.json").is_file()
    identity = checkpoint.read_state(out / "step_2")["run_identity"]
    assert identity["image_processor"]["size"] == {"height": 16, "width": 16}  # the tiny ViT's processor
