"""The T2I loss's code balancing (task option ``code_balance``)."""

import torch
import torch.nn.functional as F

from omnicore.model.losses import code_balanced_ce
from omnicore.recipe import load_recipe
from omnicore.recipe.validate import validate_recipe


def test_balance_zero_is_plain_cross_entropy():
    logits, targets = torch.randn(40, 7), torch.randint(0, 7, (40,))
    assert torch.equal(code_balanced_ce(logits, targets, 0.0), F.cross_entropy(logits, targets))


def test_full_balance_gives_each_code_the_same_weight():
    # 30 targets of code 0 (a background) and 2 of code 3: balance 1 averages the two codes' mean losses
    targets = torch.tensor([0] * 30 + [3] * 2)
    logits = torch.randn(32, 5)
    per = F.cross_entropy(logits, targets, reduction="none")
    expected = (per[:30].mean() + per[30:].mean()) / 2
    assert torch.allclose(code_balanced_ce(logits, targets, 1.0), expected)


def test_rare_codes_get_more_of_the_gradient():
    targets = torch.tensor([0] * 30 + [3] * 2)
    grads = []
    for balance in (0.0, 0.5):
        logits = torch.zeros(32, 5, requires_grad=True)
        code_balanced_ce(logits, targets, balance).backward()
        grads.append(logits.grad[30:].norm() / logits.grad[:30].norm())
    assert grads[1] > 2 * grads[0]


def test_code_balance_is_a_t2i_option_only():
    (problem,) = validate_recipe(load_recipe("quickstart", ["stages.2.tasks.mmu.code_balance=0.5"]))
    assert "stages.2.tasks.mmu.code_balance: only the t2i task" in problem
    loaded = load_recipe("quickstart", ["stages.3.tasks.t2i.code_balance=0.5"])
    assert validate_recipe(loaded) == []
    assert loaded.recipe.stages[3].tasks["t2i"].loss_options() == {"code_balance": 0.5}
