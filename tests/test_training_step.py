"""The optimizer step both trainers run: fused AdamW (`make_adamw`), its state saved and restored, the
non-finite guard that skips a step on the device without reading anything back, and the EMA."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from parti.errors import PartiError
from parti.optim import EMA, NonFiniteGuard, flatten_optimizer, make_adamw, restore_optimizer, skips_on_device


def small_model(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                      nn.LayerNorm(4 * 6 * 6), nn.Linear(4 * 6 * 6, 5))
    return m.to(memory_format=torch.channels_last) if channels_last else m


def train(model: nn.Module, opt, steps: int, *, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=g)
        if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def test_make_adamw_is_fused_on_cpu_and_matches_the_per_tensor_loop():
    fused_model, loop_model = small_model(), small_model()
    fused = make_adamw(fused_model.parameters(), lr=1e-2, weight_decay=0.05)
    assert skips_on_device(fused) and all(g["fused"] for g in fused.param_groups)
    # Same grouping (no decay on 1-d params), the per-tensor implementation.
    decay = [p for p in loop_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in loop_model.parameters() if p.dim() < 2]
    loop = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert not skips_on_device(loop)
    train(fused_model, fused, 5)
    train(loop_model, loop, 5)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(fused_model.parameters(), small_model().parameters()))


def test_a_restored_fused_optimizer_continues_exactly_with_channels_last_weights():
    """Moments come back from safetensors contiguous; fused AdamW pairs parameter and moments as flat memory,
    so restoring them beside channels-last weights must give them the weights' layout again."""
    whole = small_model(channels_last=True)
    whole_opt = make_adamw(whole.parameters(), lr=1e-2, weight_decay=0.05)
    train(whole, whole_opt, 3, seed=1)
    train(whole, whole_opt, 3, seed=2)

    first = small_model(channels_last=True)
    first_opt = make_adamw(first.parameters(), lr=1e-2, weight_decay=0.05)
    train(first, first_opt, 3, seed=1)
    tensors, meta = flatten_optimizer(first_opt, "opt")
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # as they come back from the file
    meta = json.loads(json.dumps(meta))
    resumed = small_model(channels_last=True)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), first.parameters()):
            p.copy_(q)
    resumed_opt = make_adamw(resumed.parameters(), lr=1e-2, weight_decay=0.05)
    restore_optimizer(resumed_opt, tensors, meta, "opt")
    train(resumed, resumed_opt, 3, seed=2)
    for a, b in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def no_host_reads(monkeypatch):
    """Inside the block, reading a tensor's value on the host raises (on a GPU each would be a sync)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    class Block:
        def __enter__(self):
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                monkeypatch.setattr(torch.Tensor, name, refuse)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Block()


def guarded_step(model, opt, guard, ema, x, *, poison: bool):
    loss = model(x).square().mean() * (float("nan") if poison else 1.0)
    if guard.step(loss, None, opt):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, skip=guard.bad)


def snapshot(model, opt, ema) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()] + [v.clone() for v in ema.shadow.values()]
    for st in opt.state.values():
        out += [v.clone() for v in st.values() if torch.is_tensor(v)]
    return out


def test_a_nonfinite_step_is_skipped_on_the_device_without_reading_back(no_host_reads, caplog):
    model = small_model()
    opt = make_adamw(model.parameters(), lr=1e-2, weight_decay=0.05)
    ema, guard = EMA(model, 0.9), NonFiniteGuard(limit=3)
    x = torch.randn(4, 3, 6, 6)
    guarded_step(model, opt, guard, ema, x, poison=False)  # creates the moments
    before = snapshot(model, opt, ema)
    with no_host_reads:
        guarded_step(model, opt, guard, ema, x, poison=True)
        guarded_step(model, opt, guard, ema, x, poison=True)
    after = snapshot(model, opt, ema)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(float(st["step"]) == 1.0 for st in opt.state.values())  # the skipped steps do not count
    with caplog.at_level(logging.WARNING):
        guard.report()
    assert guard.total == 2 and "2 step(s) skipped (2 in a row now, 2 in all)" in caplog.text
    with no_host_reads:
        guarded_step(model, opt, guard, ema, x, poison=False)  # a good step moves everything again
    assert not torch.equal(next(model.parameters()), before[0])
    assert any(not torch.equal(a, b) for a, b in zip(ema.shadow.values(), after[len(list(model.parameters())):]))
    for _ in range(3):
        guarded_step(model, opt, guard, ema, x, poison=True)
    with pytest.raises(PartiError, match="NaN/inf for 3 steps in a row"):
        guard.report()


def test_a_run_cut_by_a_good_step_does_not_count_as_one_row():
    model = small_model()
    opt = make_adamw(model.parameters(), lr=1e-2, weight_decay=0.05)
    ema, guard = EMA(model, 0.9), NonFiniteGuard(limit=3)
    x = torch.randn(4, 3, 6, 6)
    for poison in (True, True, False, True, True, False):
        guarded_step(model, opt, guard, ema, x, poison=poison)
    guard.report()  # 4 bad steps, at most 2 in a row: no error
    assert guard.total == 4


def test_without_a_fused_optimizer_the_bad_step_is_not_run():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(limit=2)
    loss = model(torch.randn(2, 3, 6, 6)).sum()
    assert guard.step(loss, None, opt) is True
    assert guard.step(loss * float("inf"), None, opt) is False and guard.total == 1
    with pytest.raises(PartiError, match="2 steps in a row"):
        guard.step(loss * float("nan"), None, opt)


def test_ema_update_is_the_moving_average():
    model = small_model()
    ema = EMA(model, 0.75)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.shadow[k], start[k] + 0.25 * (v - start[k]))


def test_under_fp16_loss_scaling_the_verdict_is_read_at_once():
    """accelerate's GradScaler sets found_inf itself (from the gradients): the guard must not rely on it."""
    class ScaledAccelerator:
        num_processes, scaler = 1, object()

    model = small_model()
    opt = make_adamw(model.parameters(), lr=1e-2, weight_decay=0.05)
    guard = NonFiniteGuard()
    loss = model(torch.randn(2, 3, 6, 6)).sum()
    assert guard.step(loss * float("nan"), ScaledAccelerator(), opt) is False and guard.total == 1
    assert not hasattr(opt, "found_inf")
    assert guard.step(loss, ScaledAccelerator(), opt) is True


def test_a_checkpoint_from_the_per_tensor_optimizer_resumes_fused():
    old_model, new_model = small_model(), small_model()
    old = torch.optim.AdamW(old_model.parameters(), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    train(old_model, old, 3, seed=1)
    tensors, meta = flatten_optimizer(old, "opt")
    tensors = {k: v.clone() for k, v in tensors.items()}  # as they come back from the file
    assert all(g["fused"] is None for g in meta["param_groups"])
    with torch.no_grad():
        for p, q in zip(new_model.parameters(), old_model.parameters()):
            p.copy_(q)
    new = make_adamw(new_model.parameters(), lr=1e-2, weight_decay=0.0)
    old_groups = [{**g, "params": list(range(len(g["params"])))} for g in meta["param_groups"]]
    new.param_groups = new.param_groups[:1]  # one group, as the old optimizer had
    new.param_groups[0]["params"] = list(new_model.parameters())
    restore_optimizer(new, tensors, {**meta, "param_groups": old_groups}, "opt")
    assert skips_on_device(new)
    train(old_model, old, 3, seed=2)
    train(new_model, new, 3, seed=2)
    for a, b in zip(new_model.parameters(), old_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_make_adamw_is_not_fused_where_torch_has_no_fused_kernel():
    params = [nn.Parameter(torch.empty(4, 4, device="meta"))]
    assert not skips_on_device(make_adamw(params, lr=1e-3, weight_decay=0.0))


def test_ema_in_chunks_equals_one_pass(monkeypatch):
    model = small_model()
    whole, chunked = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    whole.update(model)
    monkeypatch.setattr(EMA, "CHUNK", 50)  # several chunks, some of one tensor
    chunked.update(model, skip=torch.tensor(0.0))
    for k in whole.shadow:
        assert torch.equal(whole.shadow[k], chunked.shadow[k])


def test_a_generator_training_step_reads_nothing_back(no_host_reads):
    """The loop between log steps of `parti train` with cached text states (a frozen T5): condition dropout,
    the generator, the guard, fused AdamW and the EMA, with no tensor read on the host (a GPU sync). (A
    trainable text encoder adds one: transformers' T5 tests `padding_mask.all()` on the host to skip its mask.)"""
    from parti.generator import build_generator
    from parti.train_generator import Objective

    torch.manual_seed(0)
    gen = build_generator("tiny")
    model = Objective(gen, None)
    opt = make_adamw(model.parameters(), lr=1e-3, weight_decay=0.05)
    ema, guard = EMA(gen, 0.99), NonFiniteGuard()
    states, mask = torch.randn(2, 5, gen.config.text_dim), torch.ones(2, 5, dtype=torch.bool)
    codes = torch.randint(0, gen.config.num_codes, (2, gen.config.seq_len))
    start = [p.detach().clone() for p in gen.parameters()]
    for _ in range(2):
        with no_host_reads:
            drop = torch.rand(2) < 0.5
            loss = model(codes, states, mask, drop)
            assert guard.step(loss, None, opt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 4.0)
            opt.step()
            ema.update(gen, skip=guard.bad)
    guard.report()
    assert guard.total == 0 and any(not torch.equal(a, p) for a, p in zip(start, gen.parameters()))
