"""imgft: fine-tune any 🤗 Transformers image classifier with a plain PyTorch + Accelerate loop.

train_loop.py is the loop. This package holds what sits behind its steps, in layers:
- the core the loop uses, module by module in the order the loop reaches them:
  - step 1: args;
  - step 2: data, images (reading files) and stream (--streaming);
  - step 3: model, with preprocessing (the processor's own resize and crop), layers (backbone or head),
    drop_path, freezing and peft_model;
  - step 4: transforms and augment;
  - step 5: optimizer, layer_decay and batches (what one optimizer step sees);
  - the loop itself: train_state (its counters), losses, nonfinite (NaN/inf steps), metrics, best,
    train_log (its log lines), checkpoint, outputs (what it leaves in output_dir), run_lock, runtime and errors;
- recipes/: fine-tuning recipes turned on by flag (Mixup/CutMix, EMA, class-balanced sampling);
- commands/: the tools around the loop (`python -m imgft ...`): evaluate, predict (both with test-time
  augmentation from tta), lr-find, check-data, demo-data;
- report/: what a person reads after a run: eval_results.json, the pictures and the model card.
The benchmark lives apart from the package, in benchmarks/ at the top of the repository.
"""
