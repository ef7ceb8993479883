"""imgft: fine-tune any 🤗 Transformers image classifier with a plain PyTorch + Accelerate loop (see train_loop.py)."""
