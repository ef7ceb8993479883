"""What a run leaves in output_dir: the model (gathered whole), the best model's weights, results, metrics log
(and its copy in the trackers) and config; guarding that folder; and pushing the finished model to the Hub."""

import contextlib
import json
import math
import os
import shutil
import socket
import uuid

import yaml
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from imgft import best
from imgft.args import ABSOLUTE_PATHS_KEY, absolute_paths
from imgft.checkpoint import (
    CHECKPOINT_NAME,
    STAGING_PREFIX,
    compare_runs,
    has_checkpoints,
    read_state,
    save_failed_message,
    training_length_changes,
)
from imgft.errors import UserError, failing_together
from imgft.recipes import ema
from imgft.runtime import hub_offline

RESULTS_FILE = "all_results.json"
METRICS_LOG = "metrics.jsonl"
CONFIG_FILE = "imgft_config.yaml"
TRACKER_DIR = "imgft"  # accelerate's trackers write under output_dir/<project name>
BEST_DIR = "best_model"  # the best evaluation's model, loadable as output_dir's, with --load_best_model_at_end
ADAPTER_DIR = "adapter"  # with --use_peft, the adapter alone (the model beside it has it merged in)
# The report (imgft.report.reports): also what `python -m imgft evaluate --output_dir` writes.
EVAL_RESULTS_FILE = "eval_results.json"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
MISTAKES_FILE = "mistakes.png"
TRAINING_CURVES_FILE = "training_curves.png"
CARD_FILE = "README.md"  # the model card
# Files a finished run writes beside its checkpoints; --overwrite_output_dir removes these and nothing else.
RUN_FILES = (
    CARD_FILE,
    EVAL_RESULTS_FILE,
    CONFUSION_MATRIX_FILE,
    MISTAKES_FILE,
    TRAINING_CURVES_FILE,
    RESULTS_FILE,
    METRICS_LOG,
    CONFIG_FILE,
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
)


def check_output_dir(output_dir, resume_requested, overwrite, config):
    """Refuse to start over an earlier run, or over files of the names a run writes, unless asked to; return
    True when this run has already finished.

    A finished run relaunched with --resume_from_checkpoint (a scheduler's blind restart) has nothing
    left to do, provided it is the same run.
    """
    if overwrite or not os.path.isdir(output_dir):
        return False
    finished = os.path.exists(os.path.join(output_dir, RESULTS_FILE))
    if finished and resume_requested:
        saved_config_path = os.path.join(output_dir, CONFIG_FILE)
        saved = _read_run_config(saved_config_path) if os.path.exists(saved_config_path) else {}
        unsafe, _ = compare_runs({"config": saved}, {"config": config})
        unsafe += training_length_changes(saved, config)
        if unsafe:
            raise UserError(
                f"{output_dir} holds a finished run with other settings ({'; '.join(unsafe)}); "
                "pass --overwrite_output_dir to replace it, or choose another --output_dir"
            )
        return True
    if finished:
        raise UserError(
            f"{output_dir} holds a finished run; to run it again, pass a new --output_dir "
            "(or --overwrite_output_dir to replace it)"
        )
    if not resume_requested and has_checkpoints(output_dir):
        raise UserError(
            f"{output_dir} holds checkpoints of an unfinished run; pass --resume_from_checkpoint latest "
            "to continue it, or --overwrite_output_dir to start over"
        )
    # Someone's own README.md or config.json, say: no imgft run wrote them (each writes its config first).
    theirs = [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if not resume_requested and theirs and not os.path.exists(os.path.join(output_dir, CONFIG_FILE)):
        raise UserError(
            f"{output_dir} holds {', '.join(theirs)}, not written by an imgft run, which this run would "
            "replace; choose another --output_dir, or pass --overwrite_output_dir to replace them"
        )
    return False


SHARED_CHECK_PREFIX = ".imgft-shared-check-"


def check_every_process_sees_output_dir(accelerator, output_dir):
    """Refuse a run whose processes do not all see one output_dir: a folder local to each machine, or a
    relative path from different working directories. Checkpoints would then be split between machines,
    and a resume would find a different checkpoint, or none, on each.

    The main process writes a file with a fresh random name into output_dir; every process then looks for
    it, and every process raises the same UserError naming the hosts that cannot see it. The file goes, and
    so does the folder if the check made it: a run refused later leaves nothing behind. No process returns
    before they are gone: one that went on would read the folder (`check_output_dir`) as it vanished.
    """
    if accelerator.num_processes == 1:
        return
    name = [SHARED_CHECK_PREFIX + uuid.uuid4().hex]
    made_folder = accelerator.is_main_process and not os.path.isdir(output_dir)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, name[0]), "w").close()
    broadcast_object_list(name)  # the main process's name, sent once its file is written
    marker = os.path.join(output_dir, name[0])
    here = {"host": socket.gethostname(), "rank": accelerator.process_index}
    views = gather_object([{**here, "path": os.path.abspath(output_dir), "sees": os.path.exists(marker)}])
    if accelerator.is_main_process:
        os.remove(marker)
        if made_folder:
            os.rmdir(output_dir)
    accelerator.wait_for_everyone()
    main = views[0]
    blind = [view for view in views if not view["sees"]]
    if blind:
        where = ", ".join(f"{view['host']} (rank {view['rank']}, {view['path']})" for view in blind)
        raise UserError(
            f"--output_dir {output_dir} is not one folder that every process sees: {where} cannot see what "
            f"{main['host']} (rank 0) wrote in {main['path']}. Put output_dir on storage that all machines "
            "share (NFS, Lustre...) under the same path, and give it as an absolute path"
        )


def _read_run_config(path):
    """A saved run config as `args.to_dict` gave it: without the absolute paths written beside it."""
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file) or {}
    return {key: value for key, value in config.items() if key != ABSOLUTE_PATHS_KEY}


def delete_previous_run_files(output_dir):
    """Remove what an earlier imgft run wrote in `output_dir`, leaving every other file alone."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name in RUN_FILES and os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path) and (
            CHECKPOINT_NAME.match(name)
            or name.startswith(STAGING_PREFIX)
            or name in (TRACKER_DIR, BEST_DIR, ADAPTER_DIR)
        ):
            shutil.rmtree(path)


def start_run_files(output_dir, train_args, resume_path, config):
    """On the main process, before the first step: clear or trim what an earlier run left, save the config.

    A resumed run rewrites whatever the interrupted one logged after its checkpoint; resumed from another
    folder's checkpoint, it starts from that run's metrics log, so the curves keep their history.
    """
    if train_args.overwrite_output_dir and resume_path is None:
        delete_previous_run_files(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    # The trackers' history is rebuilt from metrics.jsonl (`replay_metrics_to_trackers`), which holds
    # exactly what the run logged up to its checkpoint, whereas TensorBoard's own log may hold more.
    shutil.rmtree(os.path.join(output_dir, TRACKER_DIR), ignore_errors=True)
    metrics_log = os.path.join(output_dir, METRICS_LOG)
    if resume_path is None:
        _keep_first_lines(metrics_log, metrics_log, 0)
    else:
        logged_lines = read_state(resume_path)["metrics_log_lines"]
        source_log = os.path.join(os.path.dirname(os.path.abspath(resume_path)), METRICS_LOG)
        _keep_first_lines(source_log, metrics_log, logged_lines)
    write_run_config(os.path.join(output_dir, CONFIG_FILE), config)


def write_run_config(path, config):
    """The run's config, which reruns it, with the absolute paths its relative ones meant, so that it also
    reruns from another directory (args.parse_args reads them; `config` itself, a resume's identity, is kept)."""
    with open(path, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file, sort_keys=False, allow_unicode=True)
        recorded = absolute_paths(config)
        if recorded:
            file.write("# The absolute paths that the relative ones above meant, for a rerun from another directory\n")
            yaml.safe_dump({ABSOLUTE_PATHS_KEY: recorded}, file, sort_keys=False, allow_unicode=True)


def _keep_first_lines(source, destination, keep):
    """Write the first `keep` lines of `source` (if it exists) to `destination`."""
    lines = []
    if os.path.exists(source):
        with open(source, encoding="utf-8") as file:
            lines = file.readlines()[:keep]
    if lines or os.path.exists(destination):
        with open(destination, "w", encoding="utf-8") as file:
            file.writelines(lines)


@contextlib.contextmanager
def saving_final_files(output_dir):
    """Around the final save (every process): a full disk (or any OS error) becomes one line naming the folder
    and the problem, on every process (`errors.failing_together`). all_results.json, which marks a run as
    finished, is written last, so such a run is resumable."""
    with failing_together(lambda err: save_failed_message("the final model and results", output_dir, err)):
        yield


def append_metrics_line(accelerator, output_dir, record):
    """One line in output_dir/metrics.jsonl, written by the main process."""
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, METRICS_LOG), "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def tracker_scalars(record):
    """A metrics.jsonl record as tracker scalars: eval_accuracy -> eval/accuracy, loss -> train/loss,
    train_images_per_second -> train/images_per_second."""
    return {
        key.replace("eval_", "eval/", 1) if key.startswith("eval_") else "train/" + key.removeprefix("train_"): value
        for key, value in record.items()
        if key not in ("step", "epoch")
    }


def replay_metrics_to_trackers(accelerator, output_dir):
    """Log every line of output_dir/metrics.jsonl to the trackers again: after a resume, their history is
    then what the run left alone would have logged, without the steps an interrupted run logged after its
    checkpoint (or twice)."""
    metrics_log = os.path.join(output_dir, METRICS_LOG)
    if not os.path.exists(metrics_log):
        return
    with open(metrics_log, encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            accelerator.log(tracker_scalars(record), step=record["step"])


def tracker_config(config):
    """Trackers take flat scalars; TensorBoard's hparams refuse None and lists, so those become strings."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in config.items()}


def final_results(
    eval_results, state, train_samples, unreadable_images, train_runtime, train_speed, stopped_early, saved_weights
):
    """What all_results.json holds: the final evaluation and how the training went (`state`, a TrainState;
    `train_speed` from runtime.SpeedClock.speed), the best evaluation, and with --ema_decay which weights
    were saved."""
    return {
        **eval_results,
        "epoch": state.epoch_position(),
        "train_steps": state.completed_steps,
        "train_loss": state.mean_train_loss(),
        "train_runtime": train_runtime,
        "train_samples": train_samples,
        "train_samples_per_second": train_speed["train_images_per_second"],
        "unreadable_images": unreadable_images,
        "skipped_nonfinite_steps": state.skipped_steps,
        "stopped_early": stopped_early,
        **best.summary(state.best),
        **ema.summary(saved_weights),
    }


def json_safe(values):
    """JSON has no NaN or Infinity: a diverged metric becomes null rather than invalid JSON."""
    return {key: None if isinstance(item, float) and not math.isfinite(item) else item for key, item in values.items()}


def write_json(path, value):
    """Write `value` as JSON, whole or not at all: a kill or a full disk mid-write leaves no half file."""
    staging_path = path + ".tmp"
    with open(staging_path, "w", encoding="utf-8") as file:
        json.dump(json_safe(value), file, indent=2, ensure_ascii=False)
        file.write("\n")
    os.replace(staging_path, path)


def hub_token(explicit_token):
    from huggingface_hub import get_token

    return explicit_token or get_token()


def check_output_dir_can_be_a_folder(output_dir):
    """Refuse, before any work, an output_dir that is a file or lies under one: otherwise the first write,
    after the data, the model and perhaps the whole run, would end in a FileExistsError traceback."""
    existing = os.path.abspath(output_dir)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(existing):
        return
    where = "is" if existing == os.path.abspath(output_dir) else f"lies under {existing}, which is"
    what = "a file" if os.path.exists(existing) else f"a link to the missing {os.readlink(existing)}"
    raise UserError(f"--output_dir {output_dir} {where} {what}, not a folder: choose another --output_dir")


def check_push_possible(train_args):
    """Say before training, not after it, that a requested push cannot happen."""
    if not train_args.push_to_hub:
        return
    if hub_offline():
        raise UserError("--push_to_hub cannot work offline: HF_HUB_OFFLINE is set")
    if not hub_token(train_args.hub_token):
        raise UserError("--push_to_hub needs a token: pass --hub_token, set HF_TOKEN or run `hf auth login`")


def push_to_hub(train_args):
    from huggingface_hub import HfApi

    from imgft.report.model_card import point_usage_at

    api = HfApi(token=hub_token(train_args.hub_token))
    named = train_args.hub_model_id or os.path.basename(os.path.abspath(train_args.output_dir))
    repo_id = api.create_repo(named, exist_ok=True).repo_id
    point_usage_at(train_args.output_dir, named, repo_id)  # the card then loads what the push created
    api.upload_folder(
        repo_id=repo_id,
        folder_path=train_args.output_dir,
        commit_message="imgft: fine-tuned model",
        ignore_patterns=["step_*", "epoch_*", STAGING_PREFIX + "*", BEST_DIR + "/*"],
    )
    return repo_id


def save_best_model(accelerator, model, image_processor, output_dir):
    """Save the model to output_dir/best_model as the final save saves it to output_dir, so that pipeline() loads
    the folder (every process calls it; the main process writes): its config and image processor, and its weights,
    gathered whole where FSDP shards them. An adapter model's are saved with the adapter merged in, and the adapter
    alone in best_model/adapter, which `load_weights` loads back at the end of the run."""
    from imgft import peft_model  # imgft.peft_model imports this module

    best_dir = os.path.join(output_dir, BEST_DIR)
    # A full disk: one line on every process. A best_model/ left half-written is rewritten by the resume,
    # which repeats this evaluation, before anything reads it.
    with failing_together(lambda err: save_failed_message("the best model", output_dir, err)):
        plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        if peft_model.is_adapter_model(plain_model):
            peft_model.save_adapter_and_merged_copy(plain_model, best_dir, accelerator)
        else:
            plain_model.save_pretrained(
                best_dir, is_main_process=accelerator.is_main_process, state_dict=gathered_weights(accelerator, model)
            )
        if accelerator.is_main_process:
            image_processor.save_pretrained(best_dir)


def gathered_weights(accelerator, model):
    """For save_pretrained's `state_dict`: the whole weights of a model that FSDP or DeepSpeed shard, gathered
    by `accelerator.get_state_dict` (every process must call it), or None for any other model, whose
    save_pretrained then reads its own (a state_dict taken through torch.compile's wrapper would name
    every weight `_orig_mod.*`). --use_peft is refused with either (args.check_args), so an adapter
    model's weights are its own.
    """
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.get_state_dict(model)
    return None


def load_weights(model, folder):
    """Copy the weights saved by save_pretrained in `folder` into `model` (the best evaluation's, at the end).

    Loaded through from_pretrained rather than a raw state dict: transformers may save tensors under
    other names than the live model uses, and maps them back only on that path. An adapter model loads only
    its adapter, from folder/adapter: its frozen weights never changed. set_model_state_dict,
    where FSDP shards the model, gives each process its own part of the whole weights; otherwise it loads
    them.
    """
    from imgft import peft_model  # imgft.peft_model imports this module

    if peft_model.is_adapter_model(model):
        peft_model.load_adapter_weights(model, os.path.join(folder, ADAPTER_DIR))
        return
    saved = type(model).from_pretrained(folder)
    set_model_state_dict(model, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
