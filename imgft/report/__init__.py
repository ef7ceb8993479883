"""The report a person reads after a run: eval_results.json, the pictures and the model card."""
