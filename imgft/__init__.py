"""imgft: fine-tune any 🤗 Transformers image classifier with a plain PyTorch + Accelerate loop.

train_loop.py is the loop. This package holds what sits behind its steps, in three layers:
- the core the loop uses: args (step 1), data and images (step 2: datasets, labels, decoding files),
  model (step 3), transforms (step 4), optimizer (step 5), then train_state, nonfinite, metrics, best,
  checkpoint, outputs, runtime and errors for the loop itself;
- commands/: the tools around the loop (`python -m imgft ...`): evaluate, predict, check-data, demo-data;
- report/: what a person reads after a run: eval_results.json, the pictures and the model card.
The benchmark lives apart from the package, in benchmarks/ at the top of the repository.
"""
