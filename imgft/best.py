"""The best evaluation so far: which metric, which direction, and when to stop early for want of a better one."""

from imgft.errors import UserError
from imgft.runtime import Stop

NO_BEST = {"metric": None, "step": None, "epoch": None, "results": None, "evaluations_without_improvement": 0}


def metric_key(train_args):
    name = train_args.metric_for_best_model
    return name if name.startswith("eval_") else f"eval_{name}"


def greater_is_better(train_args):
    """As given, else True for every metric but a loss (as transformers' Trainer decides)."""
    if train_args.greater_is_better is not None:
        return train_args.greater_is_better
    return not metric_key(train_args).endswith("loss")


def update(best, results, step, epoch, train_args):
    """(new best-state dict, whether this evaluation is the best so far)."""
    key = metric_key(train_args)
    if key not in results:
        known = ", ".join(name.removeprefix("eval_") for name in results if name != "eval_samples")
        raise UserError(f"--metric_for_best_model {train_args.metric_for_best_model} is not a metric here ({known})")
    value = results[key]
    if best["metric"] is None:
        improved = True
    else:
        improved = value > best["metric"] if greater_is_better(train_args) else value < best["metric"]
    if improved:
        return {
            "metric": value,
            "step": step,
            "epoch": epoch,
            "results": results,
            "evaluations_without_improvement": 0,
        }, True
    return {**best, "evaluations_without_improvement": best["evaluations_without_improvement"] + 1}, False


def stop_if_no_better(best, train_args):
    """The Stop that --early_stopping_patience asks for after that many evaluations without a better metric."""
    patience = train_args.early_stopping_patience
    if patience is None or best["evaluations_without_improvement"] < patience:
        return None
    return Stop(
        "early_stopping", f"Stopping early: {patience} evaluations without a better {train_args.metric_for_best_model}"
    )


def summary(best):
    """The best evaluation, for all_results.json."""
    return {"best_metric": best["metric"], "best_model_step": best["step"], "best_model_epoch": best["epoch"]}
