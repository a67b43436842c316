"""Process-level checks of the trainer: a real SIGKILL and resume, SIGTERM, and the declip-train command line.

Every run is a separate `declip-train` process on the CPU with one thread (bitwise-reproducible), the `clip`
preset with the tiny encoders, 32-pixel images and the embedded synthetic data (48 samples, batch 8: 6 steps an
epoch, so 8 steps cross an epoch boundary).
"""
import inspect, json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from helpers import DECLIP_TRAIN, cpu_env, load_ckpt, run_ok, train_args

RUN = dict(method='clip', image_encoder='vit-tiny', train_data='synthetic:size=48', batch_size=8, max_steps=8, save_every=2, log_every=1,
           image_size=32, min_lr=1e-4, seed=5, keep_checkpoints=1)

# The run to be interrupted is declip-train itself, with each optimiser step slowed by a sleep (the learning-rate
# schedule is wrapped; the numbers are untouched), so that the signal reliably lands in the middle of the run.
SLOW_TRAIN = r'''
import sys, time
import declip.train as T
delay = float(sys.argv.pop(1))
schedule = T.lr_at
def slow_lr_at(*args, **kwargs):
    time.sleep(delay)
    return schedule(*args, **kwargs)
T.lr_at = slow_lr_at
sys.exit(T.train_cli())
'''


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "The uninterrupted run every interrupted-and-resumed run must reproduce exactly; removed afterwards."
    import shutil
    out = tmp_path_factory.mktemp('reference') / 'run'
    run_ok(train_args(output_dir=out, **RUN), timeout=240)
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _records(out):
    return [json.loads(l) for l in open(Path(out) / 'metrics.jsonl') if l.strip()]


def _train_losses(out):
    "{step: loss} of the train records, the last record of a step winning (a resumed run logs some steps again)."
    return {r['step']: r['loss'] for r in _records(out) if r['type'] == 'train'}


def _start_slow(workdir, out, delay=0.1, script_text=SLOW_TRAIN, **params):
    "The slowed run in its own process group (a signal to the group reaches it and its DataLoader workers, not pytest)."
    script = workdir / 'slow_train.py'
    script.write_text(script_text)
    err = open(workdir / f'{Path(out).name}.stderr', 'w')
    argv = [sys.executable, str(script), str(delay)] + train_args(**dict(RUN, output_dir=out, **params))[1:]
    return subprocess.Popen(argv, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True), err.name


def _wait_for(proc, stderr_file, condition, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{Path(stderr_file).read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill(); pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _checkpoint_steps(out):
    return sorted(int(p.stem.split('_')[1]) for p in (Path(out) / 'checkpoints').glob('step_*.pt'))


def _assert_same_final_state(out, reference):
    "Exact resume: bitwise the same weights (and optimiser state) and the same losses as the uninterrupted run."
    got, ref = load_ckpt(out / 'checkpoints' / 'last.pt'), load_ckpt(reference / 'checkpoints' / 'last.pt')
    assert got['step'] == ref['step'] == RUN['max_steps']
    assert got['model'].keys() == ref['model'].keys()
    differ = [k for k in ref['model'] if not torch.equal(got['model'][k], ref['model'][k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"
    s_got, s_ref = got['optimizer']['state'], ref['optimizer']['state']
    assert s_got.keys() == s_ref.keys()
    for i in s_ref:
        for k, v in s_ref[i].items(): assert torch.equal(s_got[i][k], v), (i, k)
    assert _train_losses(out) == _train_losses(reference)
    assert (out / 'summary.json').exists()


@pytest.mark.parametrize('workers', [0, 2])
def test_sigkill_then_resume_is_exact(workdir, reference, workers):
    "Kill -9 a run after its step-4 checkpoint, resume it: the result is bitwise the uninterrupted run's."
    out = workdir / 'run'
    proc, stderr_file = _start_slow(workdir, out, workers=workers)
    _wait_for(proc, stderr_file, lambda: any(s >= 4 for s in _checkpoint_steps(out)), 'the step-4 checkpoint')
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    # whatever instant the kill landed at, last.pt is a whole checkpoint (written to a temporary file, then renamed)
    killed = load_ckpt(out / 'checkpoints' / 'last.pt')
    assert killed['step'] in (2, 4, 6) and killed['step'] % RUN['save_every'] == 0, killed['step']
    assert killed['model'].keys() == load_ckpt(reference / 'checkpoints' / 'last.pt')['model'].keys()
    assert not (out / 'summary.json').exists()                       # it really was stopped before the end
    run_ok(train_args(**dict(RUN, output_dir=out, workers=workers, resume=True)), timeout=240)
    _assert_same_final_state(out, reference)


def test_sigterm_saves_and_exits_then_resumes(workdir, reference):
    "SIGTERM: the run finishes its step, writes a checkpoint of that step, exits 143; resuming finishes the run."
    out = workdir / 'run'
    proc, stderr_file = _start_slow(workdir, out)
    logged = lambda: [r['step'] for r in _records(out) if r['type'] == 'train'] if (out / 'metrics.jsonl').exists() else []
    _wait_for(proc, stderr_file, lambda: len(logged()) >= 3, 'step 3')
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM, (rc, Path(stderr_file).read_text()[-3000:])
    stopped = load_ckpt(out / 'checkpoints' / 'last.pt')
    assert stopped['step'] == max(logged()), (stopped['step'], logged())   # the step at which it stopped
    assert 3 <= stopped['step'] < RUN['max_steps']
    assert not (out / 'summary.json').exists()
    run_ok(train_args(**dict(RUN, output_dir=out, resume=True)), timeout=240)
    _assert_same_final_state(out, reference)


@pytest.mark.parametrize('sig,workers', [(signal.SIGINT, 0), (signal.SIGINT, 2), (signal.SIGTERM, 0), (signal.SIGTERM, 2)],
                         ids=['SIGINT-0', 'SIGINT-2', 'SIGTERM-0', 'SIGTERM-2'])
def test_group_signal_stops_at_a_step_then_resumes(workdir, reference, sig, workers):
    "A stop signal to the whole process group, DataLoader workers included (a terminal's Ctrl-C, Slurm's scancel, docker stop): "
    "the run checkpoints the step it reached, says so in one line, exits 128 + signal, no traceback; resuming finishes it exactly."
    out = workdir / 'run'
    proc, stderr_file = _start_slow(workdir, out, workers=workers)
    logged = lambda: [r['step'] for r in _records(out) if r['type'] == 'train'] if (out / 'metrics.jsonl').exists() else []
    _wait_for(proc, stderr_file, lambda: len(logged()) >= 3, 'step 3')
    os.killpg(proc.pid, sig)
    rc = proc.wait(timeout=60)
    err = Path(stderr_file).read_text()
    assert rc == 128 + sig and 'Traceback' not in err, (rc, err[-3000:])
    stopped = load_ckpt(out / 'checkpoints' / 'last.pt')
    assert stopped['step'] == max(logged()) and 3 <= stopped['step'] < RUN['max_steps'], (stopped['step'], logged())
    assert f"stopped by {signal.Signals(sig).name} at step {stopped['step']}; checkpoint " in err, err[-2000:]
    run_ok(train_args(**dict(RUN, output_dir=out, workers=workers, resume=True)), timeout=240)
    _assert_same_final_state(out, reference)


SLOW_STOP = SLOW_TRAIN.replace("T.lr_at = slow_lr_at", """T.lr_at = slow_lr_at
disarm = T._disarm
def slow_disarm():                       # the stop's checkpoint comes 5 s after the step: time for a second signal
    disarm(); print('STOPPING', file=sys.stderr, flush=True); time.sleep(5)
T._disarm = slow_disarm""")


def test_second_signal_during_the_stop_ends_it_at_once(workdir):
    "A second signal while the run stops: it ends at once with the first signal's code, no traceback, its last checkpoint intact."
    out = workdir / 'run'
    proc, stderr_file = _start_slow(workdir, out, script_text=SLOW_STOP)
    logged = lambda: [r['step'] for r in _records(out) if r['type'] == 'train'] if (out / 'metrics.jsonl').exists() else []
    _wait_for(proc, stderr_file, lambda: len(logged()) >= 3, 'step 3')
    os.killpg(proc.pid, signal.SIGTERM)
    _wait_for(proc, stderr_file, lambda: 'STOPPING' in Path(stderr_file).read_text(), 'the stop')
    t0 = time.time(); os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=60)
    err = Path(stderr_file).read_text()
    assert rc == 128 + signal.SIGTERM and time.time() - t0 < 4 and 'Traceback' not in err, (rc, err[-3000:])
    assert 'SIGINT during the stop: stopped at once' in err, err[-2000:]
    ck = load_ckpt(out / 'checkpoints' / 'last.pt')['step']
    assert ck in (2, 4)                                                    # the last periodic checkpoint (save_every 2), whole
    past = max(logged()) > ck                                              # metrics logged after it: the resume drops them, saying so
    p = run_ok(train_args(**dict(RUN, output_dir=out, resume=True)), timeout=240)
    assert ('logged after that checkpoint, are dropped' in p.stderr) == past, (past, p.stderr[-2000:])
    steps = logged(); assert steps == list(range(1, RUN['max_steps'] + 1)), steps     # each step once, in order, the ones before the checkpoint kept


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_help_lists_every_parameter():
    "Every parameter of `train` and every model switch (declared once, in `models.SWITCHES`; aliases too) has a flag."
    from declip.train import train
    from declip.models import SWITCHES, ALIASES
    p = run_ok([DECLIP_TRAIN, '--help'], timeout=60)
    names = [n for n, q in inspect.signature(train).parameters.items() if not n.startswith('_') and q.kind != q.VAR_KEYWORD]
    assert len(names) > 25 and len(SWITCHES) >= 15
    names += list(SWITCHES) + list(ALIASES)
    missing = [n for n in names if f'--{n} ' not in p.stdout and f'--{n}\n' not in p.stdout]
    assert not missing, missing


def test_cli_refuses_bad_parameters_before_any_work(workdir):
    "Each bad parameter: non-zero exit, a message naming it, and no output folder (nothing was started)."
    taken = workdir / 'taken'                     # an output folder holding another run
    taken.mkdir(); (taken / 'config.json').write_text('{"method": "clip"}')
    cases = {  # name: (flags, words the error message must contain)
        'method': (dict(method='clipp'), ['method', 'clipp']),
        'image_encoder': (dict(image_encoder='vit-h14'), ['image_encoder', 'vit-h14']),
        'train_data': (dict(train_data='csv:/nope.csv'), ['/nope.csv']),
        'batch_size': (dict(train_data='synthetic:size=10', batch_size=16), ['batch_size', '16']),
        'output_dir': (dict(output_dir=taken, resume=False), ['output_dir', 'resume']),
    }
    procs = {}
    for name, (flags, _) in cases.items():
        params = dict(dict(output_dir=workdir / name, max_steps=2), **flags)
        procs[name] = subprocess.Popen(train_args(**params), env=cpu_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, (flags, words) in cases.items():
        stdout, stderr = procs[name].communicate(timeout=120)
        assert procs[name].returncode != 0, (name, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]                   # the message, not just somewhere in a traceback
        assert all(w in last for w in words), (name, words, last)
        if name != 'output_dir': assert not (workdir / name).exists(), name
    assert sorted(p.name for p in taken.iterdir()) == ['config.json']           # the other run was not touched
    assert json.loads((taken / 'config.json').read_text()) == {'method': 'clip'}
