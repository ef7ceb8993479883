"""Class-balanced sampling (--balanced_sampling): the training order drawn so that every class comes up
equally often, for imbalanced data.

Each epoch draws as many images as the training set holds, with replacement, each image with probability
1 / (classes present x its class's images). The draw depends only on (seed, epoch): Accelerate leaves a
sampler that is not a RandomSampler as it is (its seedable sampler replaces only those), gives it the epoch
through `DataLoader.set_epoch`, and shards its batches across processes, all of which draw the same order.
So a resume (which skips the epoch's first batches) and every DDP process see exactly the order of an
uninterrupted run. Nothing here needs saving in a checkpoint.
"""

import numpy as np
from torch.utils.data import Sampler


def balanced_sampler(labels, train_args):
    """With --balanced_sampling, a BalancedSampler over `labels` (each training row's class); else None."""
    if not train_args.balanced_sampling:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    probabilities = 1.0 / counts[labels]  # each class's images share the same total
    return BalancedSampler(probabilities / probabilities.sum(), train_args.seed)


class BalancedSampler(Sampler):
    """Row indices drawn with replacement by `probabilities`, from a generator seeded by (seed, epoch)."""

    def __init__(self, probabilities, seed):
        self.probabilities = probabilities
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.probabilities)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        size = len(self.probabilities)
        yield from rng.choice(size, size=size, p=self.probabilities).tolist()
