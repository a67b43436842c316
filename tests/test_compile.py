"""torch.compile of the training forward on the CPU (inductor): a compiled step gives eager's loss and update.

Process-level because compiling a DeCLIP graph takes minutes, far beyond a notebook test.
"""
import copy

import pytest
import torch

from declip.models import create_model, random_batch
from declip.step import make_optimizer, train_step


def _run(model, fwd, batch):
    "Gradients of one forward + backward through `fwd`, then one trainer step (declip.step.train_step) through it: (grads, loss, terms)."
    model.train()
    fwd(batch)['loss'].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    opt = make_optimizer(model, 1e-3, 0.1, torch.device('cpu'))
    out, finite, n = train_step(model, [batch], opt, 1e-3, fwd=fwd)
    assert finite and n == 1
    return grads, out['loss'].item(), {k: v.item() for k, v in out['losses'].items()}


# Below this a gradient is rounding noise: the five SimSiam biases that feed a batch norm (which removes them) have
# eager gradients of 4.5e-11 to 8.8e-8, the smallest real one is 2.5e-5 (median 8e-3); compiled and eager noise of
# projector.0.bias differed by 1.7e-7 on an AMD EPYC (2026-12-07), over the 1e-7 floor of the relative check.
ZERO_GRAD = 1e-6


@pytest.mark.parametrize('method', ['clip', 'declip'])
def test_compiled_step_equals_eager(method):
    torch.manual_seed(0); torch.set_num_threads(1)
    eager = create_model(method, image_encoder='vit-tiny', text_encoder='text-tiny', image_size=32, context_length=16,
                         **({'nn_queue_size': 64} if method == 'declip' else {}))
    compiled = copy.deepcopy(eager)
    batch = random_batch(eager, 8)
    g_e, loss_e, terms_e = _run(eager, eager, batch)
    torch._dynamo.reset()
    g_c, loss_c, terms_c = _run(compiled, torch.compile(compiled), batch)     # what train(compile=True) runs the forward through
    # inductor fuses and reorders float operations: equal up to rounding, not bitwise
    assert terms_c.keys() == terms_e.keys() and g_c.keys() == g_e.keys()
    assert abs(loss_c - loss_e) <= 1e-4 * max(1., abs(loss_e)), (loss_c, loss_e)
    for k in terms_e: assert abs(terms_c[k] - terms_e[k]) <= 1e-4 * max(1., abs(terms_e[k])), (k, terms_c[k], terms_e[k])
    for n in g_e:                       # every gradient the same up to rounding, relative to its tensor's scale
        scale = g_e[n].abs().max().item()
        if scale < ZERO_GRAD:           # analytically zero (a bias right before batch norm): rounding noise in both, of any sign
            assert g_c[n].abs().max().item() < ZERO_GRAD, (n, g_c[n].abs().max().item(), scale); continue
        assert (g_c[n] - g_e[n]).abs().max().item() <= 1e-3 * scale + 1e-7, (n, (g_c[n] - g_e[n]).abs().max().item(), scale)
