"""MQAR (Zoology): the generator's invariants as Zoology draws them, the model's causality for
every mixer, a tiny end-to-end run that beats chance for attention, and the CLI."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import assert_fa3_close
from headwise import cli
from headwise.evals import mqar

V, L, K = 64, 32, 4


def _data(n=200, seed=3, **kwargs):
    return mqar.mqar_data(V, n, L, K, seed, **kwargs)


def test_generator_invariants():
    x, y = _data()
    assert x.shape == y.shape == (200, L) and x.dtype == y.dtype == torch.int64
    keys, values = x[:, 0 : 2 * K : 2], x[:, 1 : 2 * K : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row_x, row_y, k, v in zip(x, y, keys, values):
        assert len(set(k.tolist())) == K and len(set(v.tolist())) == K  # distinct in a sequence
        queries = row_x[2 * K :]
        at = torch.nonzero(queries).flatten()
        assert (at % 2 == 0).all()  # even offsets after the context
        assert sorted(queries[at].tolist()) == sorted(k.tolist())  # each key queried once
        labelled = torch.nonzero(row_y != mqar.IGNORE).flatten()
        assert len(labelled) == K
        assert torch.equal(labelled, at + 2 * K)  # the label sits at the query token
        pair = dict(zip(k.tolist(), v.tolist()))
        assert [pair[int(q)] for q in row_x[labelled]] == row_y[labelled].tolist()
    assert (x[:, 2 * K :][x[:, 2 * K :] != 0] < V // 2).all()  # fillers are 0 in Figure 2


def test_generator_power_law_favours_short_gaps():
    x, _ = mqar.mqar_data(V, 2000, L, K, 0)
    at = torch.nonzero(x[:, 2 * K :])[:, 1] // 2
    counts = torch.bincount(at, minlength=(L - 2 * K) // 2).float()
    assert counts[0] > counts[-1] and counts[:K].sum() > counts[-K:].sum()


def test_generator_matches_zoology_draws():
    """The same NumPy stream as zoology/data/multiquery_ar.py (np.random.seed then row-wise
    np.random.choice for keys, values, gaps): the first example drawn here by hand."""
    np.random.seed(11)
    keys = np.random.choice(np.arange(1, V // 2), replace=False, size=K)
    values = np.random.choice(np.arange(V // 2, V), replace=False, size=K)
    space = (L - 2 * K) // 2
    p = 0.01 * np.arange(1, space + 1) ** (0.01 - 1)
    gaps = np.random.choice(np.arange(space), replace=False, p=p / p.sum(), size=K)
    x, y = mqar.mqar_data(V, 1, L, K, 11)
    assert x[0, : 2 * K : 2].tolist() == keys.tolist()
    assert x[0, 1 : 2 * K : 2].tolist() == values.tolist()
    assert x[0, 2 * K + 2 * gaps].tolist() == keys.tolist()
    assert y[0, 2 * K + 2 * gaps].tolist() == values.tolist()


def test_generator_seeds_and_random_non_queries():
    a, b = _data(seed=5), _data(seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(_data(seed=6)[0], a[0])
    train, test = mqar.split_seeds(0)
    assert 0 <= train < 2**31 <= test < 2**32 and mqar.split_seeds(0) == (train, test)
    noisy, labels = _data(seed=5, random_non_queries=True)
    assert torch.equal(labels, a[1]) and (noisy != 0).float().mean() > 0.9
    assert torch.equal(noisy[a[0] != 0], a[0][a[0] != 0])


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"seq_len": 31}, "even"), ({"vocab_size": 32}, "exceed"), ({"num_kv_pairs": 9}, "4 *")],
)
def test_generator_refuses_bad_settings(kwargs, word):
    args = {"vocab_size": V, "num_examples": 2, "seq_len": L, "num_kv_pairs": K, "seed": 0}
    with pytest.raises(ValueError, match=word):
        mqar.mqar_data(**{**args, **kwargs})


@pytest.mark.parametrize("mixer", mqar.list_mixers())
def test_model_is_causal(mixer):
    """Changing the tokens from position t on leaves the logits before t unchanged: no position
    sees its own answer (the next token)."""
    torch.manual_seed(0)
    model = mqar.MQARModel(mixer, vocab_size=V, dim=16, seq_len=L).eval()
    x, _ = _data(n=2)
    t = 2 * K + 3
    changed = x.clone()
    changed[:, t:] = torch.randint(1, V, changed[:, t:].shape)
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert before.shape == (2, L, V)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[:, t:], before[:, t:])


def _conv1d_reference(module, x):
    """Zoology's ``ShortConvolution``: the depthwise ``nn.Conv1d`` cut to the first L outputs."""
    return module.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


def _fft_reference(module, x):
    """Zoology's ``fft_conv`` (FFT of size 2 L, ``y = h * u + u``) with the module's filter."""
    length, n = x.shape[1], 2 * x.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    k_f = torch.fft.rfft(module.filter(length).to(dtype), n=n) / n
    u = x.transpose(1, 2).to(dtype)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n, norm="forward")[..., :length]
    return (y + u).transpose(1, 2).to(x.dtype)


def _conv_forward_backward(module, x, run):
    leaves = [x.detach().requires_grad_(), *module.parameters()]
    out = run(module, leaves[0])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("length", "dim", "kernel", "max_len"),
    [(7, 5, 3, 7), (2, 3, 4, 2), (13, 6, -1, 13), (9, 4, -1, 16), (64, 8, -1, 64), (67, 4, -1, 69)],
)
def test_base_conv_convolutions_match_zoology(dtype, length, dim, kernel, max_len):
    """The short convolution's shifted multiply-adds equal the depthwise ``nn.Conv1d`` (a kernel
    longer than the sequence included), the long one's Toeplitz product (and beyond
    ``TOEPLITZ_MAX_LENGTH`` its FFTs) Zoology's FFT convolution (a sequence shorter than
    ``max_len`` included): outputs and the gradients of the
    input and every parameter, against the float64 reference."""
    assert mqar.TOEPLITZ_MAX_LENGTH == 64  # length 67 takes the FFT path
    torch.manual_seed(0)
    conv = mqar.BaseConv(dim, max_len, kernel).conv
    reference = _conv1d_reference if kernel > 0 else _fft_reference
    with torch.no_grad():  # O(1) filter taps, so that a wrong tap is visible in every output
        for p in conv.parameters():
            p.normal_()
    x = torch.randn(3, length, dim, dtype=torch.float64)
    oracle = _conv_forward_backward(copy.deepcopy(conv).double(), x, reference)
    low = copy.deepcopy(conv).to(dtype)
    naive = _conv_forward_backward(low, x.to(dtype), reference)
    fast = _conv_forward_backward(low, x.to(dtype), lambda m, u: m(u))
    for i, (f, n, o) in enumerate(zip(fast, naive, oracle, strict=True)):
        assert f.dtype == dtype
        assert_fa3_close(f, n, o, dtype, what=f"output/grad {i}")


def test_model_zoology_init_and_tied_head():
    model = mqar.MQARModel("attention", vocab_size=V, dim=32, seq_len=L, num_layers=2)
    out = model.layers[0].sequence_mixer.out_proj.weight
    assert abs(out.std().item() - 0.02 / 2) < 0.003
    assert abs(model.tokens.weight.std().item() - 0.02) < 0.003
    x, y = _data(n=3)
    where = y != mqar.IGNORE
    torch.testing.assert_close(model.eval()(x, where), model(x)[where])
    assert model.positions is not None
    assert mqar.MQARModel("based", vocab_size=V, dim=32, seq_len=L).positions is None


def test_dropout_reaches_layers_that_take_it():
    """``dropout`` is passed by signature, through ``**kwargs`` to a base class too, so the
    model works before and after the layers gain attention dropout."""
    from torch import nn

    class Base(nn.Module):
        def __init__(self, dim, *, dropout=0.0):
            super().__init__()
            self.dropout = dropout

    class Child(Base):
        def __init__(self, dim, **kwargs):
            super().__init__(dim, **kwargs)

    class Plain(nn.Module):
        def __init__(self, dim):
            super().__init__()

    assert mqar.takes_dropout(Base) and mqar.takes_dropout(Child)
    assert not mqar.takes_dropout(Plain)
    ctx = mqar.MixerContext(dim=8, layer_idx=0, num_layers=2, seq_len=L, dropout=0.1)
    assert mqar._with_dropout(Child, ctx, 8).dropout == 0.1
    assert isinstance(mqar._with_dropout(Plain, ctx, 8), Plain)


def test_refused_mixers_say_why():
    assert {"agent", "inline", "gaussian", "gaussian_sequence"} <= set(mqar.REFUSED)
    for name in mqar.REFUSED:
        with pytest.raises(ValueError, match="cannot be used"):
            mqar.MQARModel(name, vocab_size=V, dim=16, seq_len=L)
    with pytest.raises(ValueError, match="mixer must be one of"):
        mqar.check_mixer("nope")


def test_tiny_run_beats_chance():
    """512 examples, 4 epochs: attention's accuracy is far above chance (1 / 32 values)."""
    config = mqar.MQARConfig(
        vocab_size=V,
        seq_len=16,
        num_kv_pairs=2,
        dim=32,
        num_train=512,
        num_test=128,
        batch_size=16,
        max_epochs=4,
        lrs=(3e-3,),
    )
    (run,) = mqar.sweep_one("attention", config, show_progress=False)
    assert run.accuracy > 8 / (V // 2), run.curve
    assert run.curve[-1]["loss"] < run.curve[0]["loss"]
    assert [p["epoch"] for p in run.curve] == list(range(1, len(run.curve) + 1))


def test_plateau_rule():
    def curve(*accs):
        return [{"accuracy": a} for a in accs]

    assert not mqar._plateaued(curve(0.1, 0.2, 0.25), None)
    assert not mqar._plateaued(curve(0.1, 0.2, 0.25), 2)  # 0.25 > 0.1 + 0.01
    assert mqar._plateaued(curve(0.25, 0.25, 0.255), 2)
    assert not mqar._plateaued(curve(0.25, 0.25), 2)  # not enough epochs yet
    with pytest.raises(ValueError, match="patience"):
        mqar.MQARConfig(patience=0)


def test_cli_mqar_smoke(tmp_path, capsys):
    code = cli.main(_tiny_args(tmp_path))
    assert code == 0
    (result,) = tmp_path.glob("*.json")
    assert result.name.startswith("mqar-cpu-2")  # the preset and the device, "cpu" once
    payload = json.loads(result.read_text())
    assert payload["state"] == "complete"
    assert {r["mixer"] for r in payload["runs"]} == {"attention", "base_conv"}
    assert all(len(r["curve"]) == 1 for r in payload["runs"])
    assert "date" in payload["environment"] and "torch" in payload["environment"]
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))


def _tiny_args(tmp_path, mixers="attention,base_conv"):
    return [
        "mqar",
        *("--mixers", mixers, "--epochs", "1", "--train", "64", "--test", "32"),
        *("--batch", "32", "--lrs", "1e-3", "--workers", "1", "--device", "cpu"),
        *("--out", str(tmp_path)),
    ]


def test_sweep_reports_each_finished_job_in_job_order():
    config = mqar.MQARConfig(num_train=64, num_test=32, batch_size=32, max_epochs=1, lrs=(1e-3,))
    seen = []
    runs = mqar.sweep(
        ["base_conv", "attention"],
        [config],
        show_progress=False,
        on_done=lambda runs, done, total: seen.append(([r.mixer for r in runs], done, total)),
    )
    assert seen == [(["base_conv"], 1, 2), (["base_conv", "attention"], 2, 2)]
    assert [r.mixer for r in runs] == ["base_conv", "attention"]


def test_cli_mqar_keeps_finished_jobs_when_a_later_one_fails(tmp_path, monkeypatch):
    real = mqar.sweep_one

    def failing(mixer, *args, **kwargs):
        if mixer == "base_conv":
            raise RuntimeError("stopped")
        return real(mixer, *args, **kwargs)

    monkeypatch.setattr(mqar, "sweep_one", failing)
    with pytest.raises(RuntimeError, match="stopped"):
        cli.main(_tiny_args(tmp_path))
    (result,) = tmp_path.glob("*.json")
    payload = json.loads(result.read_text())
    assert payload["state"] == "partial: 1 of 2 jobs finished"
    assert [r["mixer"] for r in payload["runs"]] == ["attention"]
    assert "partial: 1 of 2" in next(tmp_path.glob("*.md")).read_text()


def test_pool_workers_exit_when_their_parent_is_killed(tmp_path):
    script = (
        "import multiprocessing, os, sys, time\n"
        "from headwise.evals import mqar\n"
        "if __name__ == '__main__':\n"
        "    spawn = multiprocessing.get_context('spawn')\n"
        "    pool = spawn.Pool(1, mqar._start_worker, (os.getpid(),))\n"
        "    print(pool.apply(os.getpid), flush=True)\n"
        "    pool.apply_async(time.sleep, (120,))\n"
        "    time.sleep(120)\n"
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)  # no clean-up runs in the parent
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the pool worker outlived its killed parent")


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--mixers", "agent"], "non-causal"),
        (["--mixers", "attention,zzz"], "mixer must be one of"),
        (["--lrs", "fast"], "--lrs"),
        (["--epochs", "0"], "positive integer"),
    ],
)
def test_cli_mqar_refuses_bad_arguments(capsys, argv, word):
    with pytest.raises(SystemExit) as info:
        cli.main(["mqar", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and word in err and len(err.strip().splitlines()) == 1
