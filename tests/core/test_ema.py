"""EMA with timm's warmup: early updates follow the weights, later ones decay at the configured rate."""

import torch

from ptft.core.callbacks import EMAWarmupWeightAveraging, warmup_ema


def test_warmup_ema_follows_early_weights_and_caps_the_decay():
    averaged, current = torch.zeros(3), torch.ones(3)
    # first update: decay 1 - 1 = 0, the average jumps to the current weights (plain EMA would move 0.1% of the way)
    torch.testing.assert_close(warmup_ema(averaged, current, torch.tensor(0), decay=0.999, power=2 / 3), current)
    # update 10: decay 1 - 11^(-2/3)
    expected = 1 - (1 - 11 ** (-2 / 3))
    torch.testing.assert_close(warmup_ema(averaged, current, torch.tensor(10), 0.999, 2 / 3), torch.full((3,), expected))
    # late updates: the configured decay
    torch.testing.assert_close(warmup_ema(averaged, current, torch.tensor(10**9), 0.999, 2 / 3), torch.full((3,), 1e-3))


def test_callback_uses_the_warmup_average():
    ema = EMAWarmupWeightAveraging(decay=0.99, warmup_power=0.75)
    avg_fn = ema._kwargs["avg_fn"]
    torch.testing.assert_close(avg_fn(torch.zeros(1), torch.ones(1), torch.tensor(0)), torch.ones(1))
