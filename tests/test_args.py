"""imgft.args: a YAML config plus command-line flags become three frozen dataclasses, or a UserError."""

import dataclasses
import re
from pathlib import Path

import pytest

from imgft.args import (
    DEMO_CONFIG_OVERRIDES,
    DataArguments,
    ModelArguments,
    TrainArguments,
    checkpoint_interval,
    parse_args,
    to_dict,
)
from imgft.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write_config(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def parse_error(argv):
    with pytest.raises(UserError) as info:
        parse_args(argv)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------------------------------


def test_no_arguments_gives_the_defaults():
    data, model, train = parse_args([])
    assert isinstance(data, DataArguments)
    assert isinstance(model, ModelArguments)
    assert isinstance(train, TrainArguments)
    assert (data, model, train) == (DataArguments(), ModelArguments(), TrainArguments())
    # A few defaults spelled out, so a changed default is noticed.
    assert data.train_val_split == 0.15
    assert data.random_flip is False
    assert data.crop_scale_min == 0.6
    assert model.model_name_or_path is None
    assert model.model_type == "resnet"
    assert model.config_overrides == DEMO_CONFIG_OVERRIDES
    assert train.learning_rate == pytest.approx(2e-3)
    assert train.per_device_train_batch_size == 32
    assert train.num_train_epochs == 5
    assert train.seed == 42
    assert train.mixed_precision is None
    assert train.checkpointing_steps is None


def test_argv_is_not_modified(tmp_path):
    path = write_config(tmp_path, "seed: 3\n")
    argv = [path, "--seed", "4"]
    parse_args(argv)
    assert argv == [path, "--seed", "4"]


# --- config file and command line -----------------------------------------------------------------------------------


def test_config_file_then_flags_and_flags_win(tmp_path):
    path = write_config(
        tmp_path,
        "num_train_epochs: 3\nseed: 7\nlearning_rate: 1.0e-3\noutput_dir: from_file\nmodel_type: vit\n",
    )
    data, model, train = parse_args([path, "--num_train_epochs", "9", "--output_dir", "from_cli"])
    assert train.num_train_epochs == 9  # flag overrides the file
    assert train.output_dir == "from_cli"
    assert train.seed == 7  # file value kept where no flag is given
    assert train.learning_rate == pytest.approx(1e-3)
    assert model.model_type == "vit"
    assert data == DataArguments()


def test_equals_form_of_flag_and_dashes(tmp_path):
    _, _, train = parse_args(["--learning_rate=3e-4", "--num-train-epochs", "2"])
    assert train.learning_rate == pytest.approx(3e-4)
    assert train.num_train_epochs == 2


def test_yaml_scientific_notation_string_becomes_float(tmp_path):
    # PyYAML (YAML 1.1) reads 5e-5 (no dot) as the string "5e-5".
    import yaml

    assert yaml.safe_load("learning_rate: 5e-5")["learning_rate"] == "5e-5"
    path = write_config(tmp_path, "learning_rate: 5e-5\nweight_decay: 1e-2\n")
    _, _, train = parse_args([path])
    assert isinstance(train.learning_rate, float)
    assert train.learning_rate == pytest.approx(5e-5)
    assert train.weight_decay == pytest.approx(1e-2)


def test_json_config_is_accepted(tmp_path):
    path = write_config(tmp_path, '{"learning_rate": 0.01, "seed": 5}', name="config.json")
    _, _, train = parse_args([path])
    assert train.learning_rate == pytest.approx(0.01)
    assert train.seed == 5


def test_null_in_yaml_keeps_the_default(tmp_path):
    path = write_config(tmp_path, "learning_rate: null\nmax_train_steps: null\n")
    _, _, train = parse_args([path])
    assert train.learning_rate == TrainArguments().learning_rate
    assert train.max_train_steps is None


def test_empty_config_file_gives_defaults(tmp_path):
    path = write_config(tmp_path, "# only a comment\n")
    assert parse_args([path]) == (DataArguments(), ModelArguments(), TrainArguments())


# --- unknown keys and flags -----------------------------------------------------------------------------------------


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    path = write_config(tmp_path, "learnin_rate: 1e-4\n")
    message = parse_error([path])
    assert "'learnin_rate'" in message
    assert "did you mean learning_rate?" in message
    assert path in message


def test_unknown_yaml_key_without_close_match(tmp_path):
    path = write_config(tmp_path, "zzzzqqq: 1\n")
    message = parse_error([path])
    assert "'zzzzqqq'" in message
    assert "did you mean" not in message
    assert "--help" in message


def test_unknown_cli_flag_is_named_with_suggestion():
    message = parse_error(["--learnin_rate", "1e-4"])
    assert "'--learnin_rate'" in message
    assert "did you mean --learning_rate?" in message


def test_unknown_cli_flag_with_equals_is_named():
    message = parse_error(["--per_device_train_batchsize=4"])
    assert "'--per_device_train_batchsize'" in message
    assert "did you mean --per_device_train_batch_size?" in message


def test_stray_positional_argument_is_refused():
    message = parse_error(["--seed", "1", "extra"])
    assert "'extra'" in message


# --- types ----------------------------------------------------------------------------------------------------------


def test_wrong_type_on_command_line_names_the_flag():
    message = parse_error(["--learning_rate", "abc"])
    assert "--learning_rate" in message
    assert "'abc'" in message
    assert "command line" in message


def test_wrong_type_in_yaml_names_the_flag_and_file(tmp_path):
    path = write_config(tmp_path, "num_train_epochs: three\n")
    message = parse_error([path])
    assert "--num_train_epochs" in message
    assert "'three'" in message
    assert path in message


def test_list_value_for_a_scalar_flag_is_refused(tmp_path):
    path = write_config(tmp_path, "learning_rate: [1, 2]\n")
    with pytest.raises(UserError):
        parse_args([path])


# --- ranges ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--learning_rate", "-0.001"], "--learning_rate"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--weight_decay", "-1"], "--weight_decay"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (["--num_train_epochs", "0"], "--num_train_epochs"),
        (["--max_train_steps", "0"], "--max_train_steps"),
        (["--image_size", "0"], "--image_size"),
        (["--train_val_split", "0"], "--train_val_split"),
        (["--train_val_split", "1"], "--train_val_split"),
        (["--train_val_split", "1.5"], "--train_val_split"),
        (["--crop_scale_min", "0"], "--crop_scale_min"),
        (["--crop_scale_min", "1.2"], "--crop_scale_min"),
        (["--checkpointing_steps", "abc"], "--checkpointing_steps"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps"),
        (["--checkpointing_steps", "-3"], "--checkpointing_steps"),
        (["--random_erasing", "1.5"], "--random_erasing must lie in [0, 1] (got 1.5)"),
        (["--random_erasing", "-0.1"], "--random_erasing must lie in [0, 1] (got -0.1)"),
        (["--randaugment_num_ops", "0"], "--randaugment_num_ops must be at least 1 (got 0)"),
        (["--randaugment_magnitude", "31"], "--randaugment_magnitude must lie in [0, 30] (got 31)"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32 - 1] (got -1)"),
        (["--seed", str(2**32)], f"--seed must lie in [0, 2**32 - 1] (got {2**32})"),
        (["--metric_for_best_model", "acuracy"], "--metric_for_best_model acuracy is not a metric imgft reports"),
        (["--metric_for_best_model", "ema_accuracy"], "(accuracy, top5_accuracy, macro_precision,"),
    ],
)
def test_out_of_range_values_are_refused(argv, flag):
    message = parse_error(argv)
    assert flag in message


@pytest.mark.parametrize("name", ["accuracy", "eval_loss", "macro_f1", "top5_accuracy"])
def test_metric_for_best_model_takes_every_reported_metric_and_the_emas_with_ema(name):
    assert parse_args(["--metric_for_best_model", name])[2].metric_for_best_model == name
    ema_name = "eval_ema_" + name.removeprefix("eval_")
    assert parse_args(["--metric_for_best_model", ema_name, "--ema_decay", "0.99"])[2].metric_for_best_model == ema_name


def test_negative_learning_rate_in_yaml_is_refused(tmp_path):
    path = write_config(tmp_path, "learning_rate: -0.5\n")
    message = parse_error([path])
    assert "--learning_rate must be a non-negative number (got -0.5)" in message


def test_negative_scientific_learning_rate_gets_the_range_message(tmp_path):
    path = write_config(tmp_path, "learning_rate: -1e-3\n")
    message = parse_error([path])
    assert "non-negative" in message


@pytest.mark.parametrize("value", ["epoch", "5"])
def test_checkpointing_steps_accepted(value):
    _, _, train = parse_args(["--checkpointing_steps", value])
    assert train.checkpointing_steps == value
    assert checkpoint_interval(train) == ("epoch" if value == "epoch" else 5)


def test_checkpointing_steps_int_from_yaml(tmp_path):
    path = write_config(tmp_path, "checkpointing_steps: 5\n")
    _, _, train = parse_args([path])
    assert train.checkpointing_steps == "5"
    assert checkpoint_interval(train) == 5


def test_checkpointing_steps_superscript_digit_is_a_user_error():
    with pytest.raises(UserError):
        parse_args(["--checkpointing_steps", "²"])


@pytest.mark.parametrize("text", ["1: 2\n", "on: 2\n"])
def test_non_string_yaml_key_is_a_user_error(tmp_path, text):
    path = write_config(tmp_path, text)
    with pytest.raises(UserError):
        parse_args([path])


# --- bool flags and choices -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--random_flip"], True),
        (["--random_flip", "true"], True),
        (["--random_flip", "True"], True),
        (["--random_flip", "false"], False),
        (["--random_flip", "no"], False),
        ([], False),
    ],
)
def test_bool_flag_on_command_line(argv, expected):
    data, _, _ = parse_args(argv)
    assert data.random_flip is expected


def test_bool_in_yaml_and_cli_override(tmp_path):
    path = write_config(tmp_path, "random_flip: true\nignore_mismatched_sizes: yes\n")
    data, model, _ = parse_args([path])
    assert data.random_flip is True
    assert model.ignore_mismatched_sizes is True
    data, _, _ = parse_args([path, "--random_flip", "false"])
    assert data.random_flip is False


def test_bool_flag_refuses_a_non_bool():
    message = parse_error(["--random_flip", "maybe"])
    assert "--random_flip" in message


@pytest.mark.parametrize(
    ("argv", "flag", "bad"),
    [
        (["--mixed_precision", "fp8"], "--mixed_precision", "'fp8'"),
        (["--lr_scheduler_type", "foo"], "--lr_scheduler_type", "'foo'"),
        (["--auto_augment", "cutmix"], "--auto_augment", "'cutmix'"),
        (["--tta", "rotate"], "--tta", "'rotate'"),
    ],
)
def test_choices_are_enforced(argv, flag, bad):
    message = parse_error(argv)
    assert flag in message
    assert bad in message
    assert "invalid choice" in message


def test_choice_in_yaml_is_enforced(tmp_path):
    path = write_config(tmp_path, "mixed_precision: fp8\n")
    message = parse_error([path])
    assert "--mixed_precision" in message
    assert path in message


@pytest.mark.parametrize("value", ["no", "fp16", "bf16"])
def test_valid_mixed_precision(value):
    _, _, train = parse_args(["--mixed_precision", value])
    assert train.mixed_precision == value


def test_valid_scheduler():
    _, _, train = parse_args(["--lr_scheduler_type", "cosine_with_restarts"])
    assert train.lr_scheduler_type == "cosine_with_restarts"


# --- cross-field checks ---------------------------------------------------------------------------------------------


def test_dataset_name_and_train_dir_together_are_refused():
    message = parse_error(["--dataset_name", "beans", "--train_dir", "x"])
    assert "--dataset_name" in message and "--train_dir" in message


def test_validation_dir_needs_train_dir():
    message = parse_error(["--validation_dir", "v"])
    assert "--validation_dir needs --train_dir" in message


# --- frozen, to_dict ------------------------------------------------------------------------------------------------


def test_parsed_arguments_are_frozen():
    data, model, train = parse_args(["--learning_rate", "0.1"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.learning_rate = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.random_flip = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.model_type = "vit"
    assert train.learning_rate == pytest.approx(0.1)


def test_to_dict_leaves_out_hub_token():
    parsed = parse_args(["--hub_token", "hf_secret", "--seed", "3"])
    assert parsed[2].hub_token == "hf_secret"
    flat = to_dict(*parsed)
    assert "hub_token" not in flat
    assert "hf_secret" not in repr(flat)
    assert flat["seed"] == 3
    all_names = {f.name for cls in (DataArguments, ModelArguments, TrainArguments) for f in dataclasses.fields(cls)}
    assert set(flat) == all_names - {"hub_token"}


def test_to_dict_round_trips_through_a_yaml_config(tmp_path):
    import yaml

    parsed = parse_args(["--learning_rate", "3e-4", "--random_flip", "--checkpointing_steps", "7"])
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(to_dict(*parsed)), encoding="utf-8")
    assert parse_args([str(path)]) == parsed


# --- the shipped configs --------------------------------------------------------------------------------------------


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"digits.yaml", "imagefolder.yaml", "vit-beans.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    import yaml

    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    data, model, train = parse_args([str(path)])
    flat = to_dict(data, model, train)
    for key, value in values.items():
        if isinstance(flat[key], float):
            assert flat[key] == pytest.approx(float(value)), key
        else:
            assert str(flat[key]).lower() == str(value).lower(), key


def test_digits_config_values_are_the_defaults():
    path = next(p for p in CONFIGS if p.name == "digits.yaml")
    from_file = to_dict(*parse_args([str(path)]))
    defaults = to_dict(*parse_args([]))
    assert from_file["output_dir"] == "output/digits"
    assert from_file["image_size"] == 32
    differing = {key for key in defaults if from_file[key] != defaults[key]}
    assert differing == {"output_dir", "image_size"}


# --- bad config files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["- learning_rate\n- seed\n", "just a string\n", "42\n"])
def test_config_that_is_not_a_mapping(tmp_path, text):
    path = write_config(tmp_path, text)
    message = parse_error([path])
    assert path in message
    assert "'flag_name: value' pairs" in message


def test_config_that_is_invalid_yaml(tmp_path):
    path = write_config(tmp_path, "learning_rate: [1e-4\nseed: 3\n")
    message = parse_error([path])
    assert "is not valid YAML" in message
    assert path in message


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    message = parse_error([path, "--seed", "1"])
    assert "cannot read config file" in message
    assert path in message


def test_no_prefix_is_only_for_flags_that_default_to_true():
    with pytest.raises(UserError, match="unknown flag '--no_random_flip'"):
        parse_args(["--no_random_flip"])


# --- YAML's booleans, config_overrides as YAML, ~ in paths, epochs with max steps ----------------------------------


@pytest.mark.parametrize(("text", "expected"), [("no", "no"), ("off", "no"), ("No", "no"), ('"no"', "no")])
def test_yaml_boolean_word_for_a_choice_is_the_choice(tmp_path, text, expected):
    # YAML 1.1 reads an unquoted `no` as false; it meant the choice "no".
    path = write_config(tmp_path, f"mixed_precision: {text}\n")
    _, _, train = parse_args([path])
    assert train.mixed_precision == expected


def test_yaml_boolean_for_a_choice_without_boolean_words_says_to_quote_it(tmp_path):
    path = write_config(tmp_path, "lr_scheduler_type: on\n")
    message = parse_error([path])
    assert "lr_scheduler_type" in message and path in message
    assert "YAML reads an unquoted yes/on/true as true" in message
    assert 'quote the value, e.g. lr_scheduler_type: "linear"' in message


def test_config_overrides_as_a_yaml_mapping_reads_back_identically(tmp_path):
    from imgft.model import parse_config_overrides

    path = write_config(
        tmp_path,
        "config_overrides:\n  embedding_size: 16\n  hidden_sizes: [16, 32, 64, 128]\n  layer_type: basic\n"
        "  hidden_act: '1'\n  downsample_in_first_stage: yes\n  out_features: null\n  drop_rate: 1.0e-5\n",
    )
    _, model, _ = parse_args([path])
    assert isinstance(model.config_overrides, str)
    assert model.config_overrides == (
        "embedding_size=16,hidden_sizes=[16,32,64,128],layer_type=basic,hidden_act='1',"
        "downsample_in_first_stage=true,out_features=null,drop_rate=1e-05"
    )
    assert parse_config_overrides(model.config_overrides) == {
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64, 128],
        "layer_type": "basic",
        "hidden_act": "1",
        "downsample_in_first_stage": True,
        "out_features": None,
        "drop_rate": 1e-5,
    }
    # The parsed text, saved in a run's config, parses back to the same arguments.
    saved = write_config(tmp_path, f"config_overrides: {model.config_overrides}\n", name="saved.yaml")
    assert parse_args([saved])[1] == model


def test_config_overrides_as_a_yaml_list_of_pairs(tmp_path):
    path = write_config(tmp_path, "config_overrides:\n  - embedding_size=16\n  - hidden_sizes=[16,32,64,128]\n")
    _, model, _ = parse_args([path])
    assert model.config_overrides == "embedding_size=16,hidden_sizes=[16,32,64,128]"


def test_config_overrides_value_that_cannot_be_text_is_named(tmp_path):
    path = write_config(tmp_path, "config_overrides:\n  label: 'a,b'\n")
    message = parse_error([path])
    assert "config_overrides: label: 'a,b' cannot be written as key=value text" in message


@pytest.mark.parametrize(
    "flag",
    ["output_dir", "train_dir", "cache_dir", "model_name_or_path", "image_processor_name", "resume_from_checkpoint"],
)
def test_tilde_is_expanded_in_path_flags(flag):
    argv = [f"--{flag}=~/somewhere"] + (["--validation_dir=~/v"] if flag == "train_dir" else [])
    parsed = parse_args(argv)
    value = next(getattr(args, flag) for args in parsed if hasattr(args, flag))
    assert value == str(Path.home() / "somewhere")
    if flag == "train_dir":
        assert parsed[0].validation_dir == str(Path.home() / "v")


def test_tilde_is_expanded_in_a_config_file_and_latest_and_hub_ids_are_left_alone(tmp_path):
    path = write_config(
        tmp_path, "output_dir: ~/out\nresume_from_checkpoint: latest\nmodel_name_or_path: google/vit-base\n"
    )
    _, model, train = parse_args([path])
    assert train.output_dir == str(Path.home() / "out")
    assert train.resume_from_checkpoint == "latest"
    assert model.model_name_or_path == "google/vit-base"


def test_zero_epochs_is_accepted_with_max_train_steps():
    _, _, train = parse_args(["--num_train_epochs", "0", "--max_train_steps", "3"])
    assert (train.num_train_epochs, train.max_train_steps) == (0, 3)
    assert "or 0 with --max_train_steps" in parse_error(["--num_train_epochs", "0"])
    assert "--num_train_epochs must be at least 0 (got -1)" in parse_error(
        ["--num_train_epochs", "-1", "--max_train_steps", "3"]
    )


# --- --help of each program that reads these arguments --------------------------------------------------------------


def listed_flags(help_text):
    """The flags a --help lists, one per option line (`  --name ...`), without the --no_X and dashed spellings."""
    return set(re.findall(r"^  --(\w+)", help_text, re.MULTILINE)) - {"help"}


def test_train_help_names_the_config_file_and_every_flag():
    from imgft.args import TRAIN_COMMAND, field_names, help_text

    text = help_text(TRAIN_COMMAND)
    assert text.startswith("usage: train_loop.py [CONFIG.yaml] [--flag value ...]\n")
    assert "Fine-tune" in text and "flags after it override its values" in text
    assert listed_flags(text) - {"no_resize_once"} == set(field_names())


@pytest.mark.parametrize(
    ("command", "read", "not_read"),
    [
        ("EVALUATE_COMMAND", ["eval_split", "max_eval_samples", "overwrite_output_dir"], ["learning_rate"]),
        ("CHECK_DATA_COMMAND", ["eval_split", "strict_data", "seed"], ["per_device_eval_batch_size", "image_size"]),
    ],
)
def test_command_help_lists_only_the_flags_it_reads(command, read, not_read):
    from imgft import args

    spec = getattr(args, command)
    text = args.help_text(spec)
    assert text.startswith(f"usage: {spec.prog} [CONFIG.yaml] [--flag value ...]\n")
    assert listed_flags(text) - {"no_resize_once"} == set(spec.shown_flags)
    assert set(read) <= listed_flags(text)
    assert not set(not_read) & listed_flags(text)
    # A training config or command line still serves it: flags it does not list are accepted.
    assert parse_args(["--learning_rate", "0.1"])[2].learning_rate == pytest.approx(0.1)
