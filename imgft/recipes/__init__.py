"""Fine-tuning recipes that the loop turns on by flag, each off by default and exact on resume: Mixup and
CutMix (mixing.py), model EMA (ema.py), class-balanced sampling (sampling.py). The loss-side recipes
(label smoothing, class weights) live with the loss, in imgft/losses.py."""
