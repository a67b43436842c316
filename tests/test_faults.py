"""The fault suite (issue 14): faults and bad inputs as a user meets them, each run as a real `declip-train` process.

Every case ends in a trained-and-saved run or in one clear line (exit 2 for bad input, 1 for a run that had to
stop or a system error), within a timeout so that a hang fails the test instead of blocking it; each test checks
the exit status, the message and what is left on disk. Tiny runs: `clip`, vit-tiny / text-tiny, 32 px, batch 8,
no workers, no evaluation unless it is the point.
"""
import io, json, os, signal, subprocess, sys, tarfile, time
from pathlib import Path

import pytest
from PIL import Image

from helpers import DECLIP_TRAIN, cpu_env, load_ckpt, run_ok, train_args

RUN = dict(method='clip', image_encoder='vit-tiny', train_data='synthetic:size=16', batch_size=8, max_steps=2, image_size=32, log_every=1)
TIMEOUT = 180          # a run that hangs fails here


def run(timeout=TIMEOUT, **params):
    "A declip-train process to its end: (exit status, stderr without warnings)."
    p = subprocess.run(train_args(**params), env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, '\n'.join(l for l in p.stderr.splitlines() if l.startswith('declip-train'))


def one_line(err, start='declip-train: error: '):
    "The one line a refused or stopped run prints."
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    return lines[0]


def write_csv(folder, good, bad, malformed=0):
    "A CSV manifest of `good` readable images, `bad` missing ones (the loader shuffles them) and `malformed` rows without an image path."
    folder.mkdir(parents=True, exist_ok=True)
    for g in range(good): Image.new('RGB', (40, 40), (g * 40, 80, 160)).save(folder / f'{g}.png')
    rows = ['filepath,title'] + [f'{g}.png,picture {g}' for g in range(good)] + [f'missing{i}.png,a missing picture {i}' for i in range(bad)] + [',no path'] * malformed
    (folder / 'train.csv').write_text('\n'.join(rows) + '\n')
    return f"csv:{folder / 'train.csv'}"


def write_shard(path, good, bad_tail):
    "A webdataset shard of `good` pictures followed by `bad_tail` corrupt ones (the stream's last samples)."
    with tarfile.open(path, 'w') as tar:
        for i in range(good + bad_tail):
            buf = io.BytesIO(); Image.new('RGB', (40, 40), (i * 15, 80, 160)).save(buf, 'PNG')
            for name, data in ((f'{i:04d}.png', buf.getvalue() if i < good else b'not a png'), (f'{i:04d}.txt', f'picture {i}'.encode())):
                info = tarfile.TarInfo(name); info.size = len(data); tar.addfile(info, io.BytesIO(data))
    return f'wds:{path}:num_samples={good + bad_tail}'


def no_max_steps(**params):
    "RUN without max_steps (the epochs decide), with `params`."
    return {k: v for k, v in dict(RUN, **params).items() if k != 'max_steps'}


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    "A finished tiny run (2 steps, a checkpoint each step) that the resume cases start from."
    out = tmp_path_factory.mktemp('faults') / 'done'
    run_ok(train_args(output_dir=out, save_every=1, keep_checkpoints=2, **RUN), timeout=TIMEOUT)
    return out


# --- hangs: a run that cannot make progress stops with a message naming the cause ---------------------------------

def test_all_samples_bad_stops_with_the_cause(workdir):
    code, err = run(output_dir=workdir / 'run', **dict(RUN, train_data=write_csv(workdir / 'data', 0, 16)))
    assert code == 1 and 'has too few good samples to fill a batch of 8' in one_line(err, 'declip-train: stopped: ') and 'missing_file' in err


@pytest.fixture(scope='module')
def corrupt_only(tmp_path_factory):
    "A run whose only shard is not a tar file: (exit status, stderr line, output folder)."
    folder = tmp_path_factory.mktemp('corrupt-only')
    (folder / 'bad.tar').write_bytes(b'this is not a tar file' * 100)
    code, err = run(output_dir=folder / 'run', **dict(RUN, train_data=f"wds:{folder / 'bad.tar'}:num_samples=16"))
    return code, err, folder / 'run'


def test_corrupt_only_shard_stops_with_the_cause(corrupt_only):
    code, err, out = corrupt_only
    assert code == 1 and "epoch 0 of train_data='wds:" in one_line(err, 'declip-train: stopped: ') and 'gave no optimiser step' in err
    assert not (out / 'checkpoints').exists()                                   # no checkpoint rewritten in a loop


def test_corrupt_only_shard_message_counts_the_bad_samples(corrupt_only):
    assert "bad samples so far: {'corrupt_shard': 1}" in corrupt_only[1]


def test_mostly_bad_data_keeps_nominal_epochs(workdir):
    "91% bad rows and one epoch: every bad sample replaced, one epoch of nominal steps, the replaced and malformed ones counted."
    spec = write_csv(workdir / 'data', 3, 30, malformed=2)
    run_ok(train_args(output_dir=workdir / 'run', **no_max_steps(train_data=spec, epochs=1)), timeout=TIMEOUT)
    s = json.loads((workdir / 'run' / 'summary.json').read_text())
    assert (s['steps'], s['epochs_done'], s['samples_seen']) == (4, 1, 32)
    assert 20 <= s['skipped']['missing_file'] <= 30 and s['skipped']['malformed_row'] == 2
    last = [json.loads(l) for l in open(workdir / 'run' / 'metrics.jsonl') if json.loads(l)['type'] == 'train'][-1]
    assert last['skipped'] == s['skipped']


def test_stream_bad_samples_at_the_end_are_counted(workdir):
    "A stream cannot replace a bad sample: its bad samples after the last good one still reach metrics.jsonl and summary.json."
    spec = write_shard(workdir / 'tail.tar', 16, 3)
    run_ok(train_args(output_dir=workdir / 'run', **no_max_steps(train_data=spec, epochs=1)), timeout=TIMEOUT)
    s = json.loads((workdir / 'run' / 'summary.json').read_text())
    assert (s['steps'], s['epochs_done'], s['skipped']) == (2, 1, {'corrupt_image': 3})
    last = [json.loads(l) for l in open(workdir / 'run' / 'metrics.jsonl') if json.loads(l)['type'] == 'train'][-1]
    assert (last['step'], last['skipped']) == (2, {'corrupt_image': 3})


# --- bad parameters: one line, exit 2, nothing created ---------------------------------------------------------------

BAD = [(dict(batch_size=1), 'batch_size=1 is too small'), (dict(lr='inf'), 'lr=inf must be a finite number'),
       (dict(base_lr=-1), 'base_lr=-1.0'), (dict(min_lr=-5), 'min_lr=-5.0'), (dict(weight_decay=-1), 'weight_decay=-1.0'),
       (dict(embed_dim=0), 'embed_dim=0'), (dict(nn_queue_size=-5), 'nn_queue_size=-5'), (dict(context_length=1), 'context_length'),
       (dict(image_size=7), 'image_size'), (dict(seed=-1), 'seed=-1'), (dict(device='foo'), "device='foo'")]
CLI_BATCH = r'''
import contextlib, io, json, sys
from declip.train import train_cli
out = []
for argv in json.load(open(sys.argv[1])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: train_cli(argv); code = 0
        except SystemExit as e: code = e.code
    out.append(dict(code=code, err='\n'.join(l for l in err.getvalue().splitlines() if l.startswith('declip-train'))))
json.dump(out, open(sys.argv[2], 'w'))
'''


def cli_batch(workdir, cases):
    "Run `train_cli` on each argv in one process (one import for many refusals): [(exit status, stderr line)]."
    (workdir / 'argv.json').write_text(json.dumps([train_args(**c)[1:] for c in cases]))
    (workdir / 'batch.py').write_text(CLI_BATCH)
    subprocess.run([sys.executable, workdir / 'batch.py', workdir / 'argv.json', workdir / 'out.json'], env=cpu_env(),
                   check=True, timeout=TIMEOUT, capture_output=True)
    return [(r['code'], r['err']) for r in json.loads((workdir / 'out.json').read_text())]


def test_bad_parameters_one_line_before_anything_exists(workdir):
    import torch
    (workdir / 'afile').write_text(''); (workdir / 'one.tar').write_bytes(b'')
    (workdir / 'pairs.csv').write_text('filepath,caption\n0.png,a picture\n')          # captions not under open_clip's 'title'
    bad = BAD + [(dict(output_dir=workdir / 'afile'), 'is a file, not a folder'),
                 (dict(output_dir=workdir / 'missing' / '..' / 'afile' / '..' / 'x'),     # `..` through a folder to make, then a file
                  f"output_dir='{workdir}/missing/../afile/../x': '{workdir / 'afile'}' is a file, not a folder"),
                 (dict(train_data=f"csv:{workdir / 'pairs.csv'}"), f"e.g. csv:{workdir / 'pairs.csv'}:caption_key=caption")]
    if not torch.cuda.is_available(): bad.append((dict(device='cuda'), 'no CUDA GPU'))
    cases = [dict(dict(RUN, output_dir=workdir / 'x'), **b) for b, _ in bad]
    cases.append(no_max_steps(train_data=f"wds:{workdir / 'one.tar'}", output_dir=workdir / 'x'))
    expected = [m for _, m in bad] + ['no known sample count: add num_samples=']
    for (code, err), want in zip(cli_batch(workdir, cases), expected, strict=True):
        assert code == 2 and want in one_line(err), (want, code, err)
    assert not (workdir / 'x').exists() and not (workdir / 'missing').exists()


def test_read_only_output_dir(workdir):
    "A folder this process cannot write in: mode 555, or (root writes through modes) a read-only filesystem."
    ro = workdir / 'ro'
    if os.geteuid() == 0: _mount_tmpfs(ro, '1m', 'ro')
    else: ro.mkdir(); os.chmod(ro, 0o555)
    try:
        code, err = run(output_dir=ro / 'run', **RUN)
        assert code == 2 and 'is not writable' in one_line(err)
    finally:
        if os.geteuid() == 0: subprocess.run(['umount', str(ro)], check=False)


def test_bad_resume_sources_one_line(workdir, finished):
    import torch
    (workdir / 'notes.txt').write_text('not a checkpoint')
    torch.save(dict(weights=torch.ones(1)), workdir / 'other.pt')
    (workdir / 'cut.pt').write_bytes((finished / 'checkpoints' / 'last.pt').read_bytes()[:4096])
    last = finished / 'checkpoints' / 'last.pt'
    cases = [(dict(resume=workdir / 'notes.txt'), 'cannot be read'), (dict(resume=workdir / 'other.pt'), "lacks ['config'"),
             (dict(resume=finished), 'is a folder'), (dict(resume=workdir / 'cut.pt'), 'cannot be read'),
             (dict(resume=last, method='slip'), "method='clip' there, 'slip' here"),
             (dict(resume=last, image_encoder='resnet-tiny'), "image_encoder='vit-tiny' there, 'resnet-tiny' here")]
    got = cli_batch(workdir, [dict(RUN, output_dir=workdir / f'r{i}', **c) for i, (c, _) in enumerate(cases)])
    for (code, err), (_, want) in zip(got, cases, strict=True): assert code == 2 and want in one_line(err), (want, err)
    assert not any((workdir / f'r{i}').exists() for i in range(len(cases)))


# --- runs lost: what was trained is on disk, and the last good checkpoint is good -----------------------------------

def test_corrupt_last_falls_back_and_torn_log_is_tolerated(workdir, finished):
    import shutil
    out = workdir / 'run'; shutil.copytree(finished, out)
    last = out / 'checkpoints' / 'last.pt'
    data = last.read_bytes(); last.unlink(); last.write_bytes(data[:len(data) // 2])      # a torn last.pt (its own inode)
    with open(out / 'metrics.jsonl', 'a') as f: f.write('{"type": "train", "ste')         # the cut-off line a kill leaves
    p = run_ok(train_args(output_dir=out, resume='true', **dict(RUN, max_steps=3)), timeout=TIMEOUT)
    assert 'newest intact checkpoint' in p.stderr and 'step_00000002.pt' in p.stderr
    assert load_ckpt(out / 'checkpoints' / 'last.pt')['step'] == 3
    steps = [json.loads(l)['step'] for l in open(out / 'metrics.jsonl') if json.loads(l)['type'] == 'train']
    assert steps == [1, 2, 3]


@pytest.mark.parametrize('method', ['clip', 'filip'])                  # FILIP scores zero-shot and retrieval token-wise
def test_bad_eval_image_is_skipped_and_the_run_saved(workdir, method):
    "An unreadable image in an ImageFolder set and a missing one in a CSV (retrieval) set: left out, counted, the run saved."
    for cls, colour in (('red', (200, 0, 0)), ('blue', (0, 0, 200))):
        (workdir / 'pets' / cls).mkdir(parents=True)
        for i in range(2): Image.new('RGB', (40, 40), colour).save(workdir / 'pets' / cls / f'{i}.png')
    (workdir / 'pets' / 'blue' / 'broken.png').write_bytes(b'not a png')
    pairs = write_csv(workdir / 'pairs', 3, 1)
    evals = f"pets=imagefolder:{workdir / 'pets'} pairs={pairs}"
    run_ok(train_args(output_dir=workdir / 'run', **dict(RUN, method=method, eval_data=evals)), timeout=TIMEOUT)
    s = json.loads((workdir / 'run' / 'summary.json').read_text())
    assert (s['eval']['pets']['skipped_images'], s['eval']['pairs']['skipped_images']) == (1, 1)
    assert load_ckpt(workdir / 'run' / 'checkpoints' / 'best.pt')['best'] == s['best']


def _mount_tmpfs(path, size, *options):
    path.mkdir()
    p = subprocess.run(['mount', '-t', 'tmpfs', '-o', ','.join((f'size={size}',) + options), 'tmpfs', str(path)], capture_output=True, text=True)
    if p.returncode: pytest.skip(f'cannot mount a small filesystem here: {p.stderr.strip()[:100]}')


def test_full_disk_one_line_previous_checkpoint_kept(workdir):
    "A filesystem with room for one checkpoint (~55 MB) but not two: the second write fails cleanly."
    fs = workdir / 'small'
    _mount_tmpfs(fs, '80m')
    try:
        code, err = run(output_dir=fs / 'run', **dict(RUN, max_steps=3, save_every=1, keep_checkpoints=1))
        assert code == 1 and 'No space left on device' in one_line(err) and 'step_00000002.pt' in err
        ck = fs / 'run' / 'checkpoints'
        assert sorted(p.name for p in ck.iterdir()) == ['last.pt', 'step_00000001.pt']   # no partial temporary file
        assert load_ckpt(ck / 'last.pt')['step'] == 1
    finally: subprocess.run(['umount', str(fs)], check=False)


NAN_TRAIN = r'''
import sys
import declip.train as T
from declip.models import DeCLIP
mode, after, calls = sys.argv.pop(1), int(sys.argv.pop(1)), {'n': 0}
if mode == 'loss':                                    # every loss after step `after` is NaN
    forward = DeCLIP.forward
    def nan_forward(self, batch, **kw):
        out = forward(self, batch, **kw); calls['n'] += 1
        if calls['n'] > after: out['loss'] = out['loss'] * float('nan')
        return out
    DeCLIP.forward = nan_forward
else:                                                 # finite losses, but NaN weights from step `after` + 1 on
    step = T.train_step
    def poisoning_step(model, *args, **kwargs):
        out = step(model, *args, **kwargs); calls['n'] += 1
        if calls['n'] == after + 1: next(model.parameters()).data.fill_(float('nan'))
        return out
    T.train_step = poisoning_step
sys.exit(T.train_cli())
'''


@pytest.mark.parametrize('mode, why', [('loss', '2 non-finite losses in a row at step 4'),
                                       ('weights', 'step 3: the model or optimiser state holds NaN or infinity')])
def test_nonfinite_stops_in_one_line_and_every_checkpoint_is_finite(workdir, mode, why):
    "NaN losses, or a finite loss that leaves NaN weights: exit 1, one line naming the last good checkpoint, which is finite."
    from declip.runs import nonfinite_tensors
    out = workdir / 'run'
    (workdir / 'nan.py').write_text(NAN_TRAIN)
    argv = [sys.executable, workdir / 'nan.py', mode, '2'] + train_args(output_dir=out, **dict(RUN, max_steps=6, save_every=1, max_nonfinite=2))[1:]
    p = subprocess.run(argv, env=cpu_env(), capture_output=True, text=True, timeout=TIMEOUT)
    line = one_line('\n'.join(l for l in p.stderr.splitlines() if l.startswith('declip-train')), 'declip-train: stopped: ')
    assert p.returncode == 1 and why in line and f"last good checkpoint: {out / 'checkpoints' / 'last.pt'}" in line, line
    written = sorted((out / 'checkpoints').glob('*.pt'))
    assert written and all(not nonfinite_tensors(c['model'], c['optimizer']) for c in map(load_ckpt, written))
    if mode == 'weights': assert load_ckpt(out / 'checkpoints' / 'last.pt')['step'] == 2


SLOW_TRAIN = r'''
import sys, time
import declip.train as T
schedule = T.lr_at
def slow_lr_at(*args, **kwargs):
    time.sleep(0.3)
    return schedule(*args, **kwargs)
T.lr_at = slow_lr_at
sys.exit(T.train_cli())
'''


def test_second_run_on_a_folder_in_use_is_refused(workdir):
    out = workdir / 'run'
    (workdir / 'slow.py').write_text(SLOW_TRAIN)
    first = subprocess.Popen([sys.executable, workdir / 'slow.py'] + train_args(output_dir=out, **dict(RUN, max_steps=200))[1:],
                             env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / 'config.json').exists():
            assert first.poll() is None and time.time() < deadline, 'the first run did not start'
            time.sleep(0.1)
        for resume in ('false', 'auto'):
            code, err = run(output_dir=out, resume=resume, **RUN)
            assert code == 2 and f'is in use by another run (pid {first.pid})' in one_line(err), err
        assert first.poll() is None                                               # the first run was not disturbed
    finally: first.kill(); first.wait()
    from declip.runs import RunLock
    RunLock(out).acquire().release()                                              # a killed run leaves no stale lock


STUCK_TRAIN = r'''
import sys, time
import declip.train as T
T.TERM_GRACE_S = 2
T.lr_at = lambda *args, **kwargs: time.sleep(600)           # no step ever completes
sys.exit(T.train_cli())
'''


def test_sigterm_ends_a_run_that_makes_no_step(workdir):
    "SIGTERM is honoured even when no step comes to checkpoint at: exit 143 after the grace time, saying why."
    out = workdir / 'run'
    (workdir / 'stuck.py').write_text(STUCK_TRAIN)
    proc = subprocess.Popen([sys.executable, workdir / 'stuck.py'] + train_args(output_dir=out, **RUN)[1:],
                            env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / 'config.json').exists():
            assert proc.poll() is None and time.time() < deadline, 'the run did not start'
            time.sleep(0.1)
        time.sleep(1); proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally: proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and 'no step for 2 s' in err, (proc.returncode, err[-2000:])


# --- reports: a failed declip-reports run leaves the last good report as it was ------------------------------------

def _report_notebook(path):
    "A study-like report notebook: parameters, a per-run record written to `records` as the run finishes, then the report files; `fail` raises in between."
    import nbformat
    v4 = nbformat.v4
    params = v4.new_code_cell("output: str = 'out'\nrecords: str = None\nsmoke: bool = False\njobs: int = 2\ntrain: bool = True\n"
                              "fail: bool = False\ntag: str = 'a'")
    params.metadata['tags'] = ['parameters']
    nbformat.write(v4.new_notebook(metadata=dict(kernelspec=dict(name='python3', display_name='Python 3', language='python'),
                                                 language_info=dict(name='python')), cells=[params, v4.new_code_cell(
        "import json\nfrom pathlib import Path\nout = Path(output); out.mkdir(parents=True, exist_ok=True)\n"
        "records = Path(records) if records else out / 'runs'; records.mkdir(parents=True, exist_ok=True)\n"
        "(records / f'{tag}.json').write_text(json.dumps(dict(key=tag)))      # a finished run's record\n"
        "(out / 'README.md').write_text(f'report {tag}')"),
        v4.new_code_cell("if fail: raise RuntimeError(f'report {tag} broke')\n(out / 'table.csv').write_text(f'tag\\n{tag}\\n')")]), path)


REPORTS_WITH_FAKE = r'''
import sys
import declip.study as S
notebook, fail, tag, out = sys.argv[1:5]
S.REPORTS['fake'] = dict(notebook=notebook, parameters=dict(fail=fail == 'fail', tag=tag), output_param='output', jobs=True, train=True)
sys.argv = ['declip-reports', 'fake', '--out', out]
S.reports_cli()
'''


def test_failed_report_leaves_the_last_good_one(workdir):
    """`declip-reports` whose notebook fails: exit 1, one line (what failed, where the failed notebook is), no traceback;
    the last good report's executed notebook, README and table are untouched, and the record the failed attempt wrote
    as its run finished is in the report's runs/."""
    import nbformat
    _report_notebook(workdir / 'fake.ipynb')
    (workdir / 'cli.py').write_text(REPORTS_WITH_FAKE)
    out, dest = workdir / 'reports', workdir / 'reports' / 'fake'
    def reports(fail, tag):
        return subprocess.run([sys.executable, workdir / 'cli.py', workdir / 'fake.ipynb', fail, tag, out], env=cpu_env(),
                              capture_output=True, text=True, timeout=TIMEOUT)
    good = reports('ok', 'first')
    assert good.returncode == 0, good.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['fake']                           # the staging folder is gone
    assert (dest / 'README.md').read_text() == 'report first' and (dest / 'table.csv').read_text() == 'tag\nfirst\n'
    before = (dest / 'fake.ipynb').read_bytes()
    bad = reports('fail', 'second')
    said = [l for l in bad.stderr.splitlines() if l.startswith('declip-reports')]
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr and len(said) == 1, bad.stderr[-3000:]
    assert said[0].startswith(f'declip-reports: fake failed: RuntimeError: report second broke (cell In [4]); {dest} was left as it was '
                              '(runs/ holds the records of the runs that finished); the failed notebook: '), said
    failed = Path(said[0].rsplit('the failed notebook: ', 1)[1])
    assert failed.parent.parent.parent == out and failed.parent.name == 'fake' and failed.name == 'fake.ipynb', failed
    assert 'report second broke' in str(nbformat.read(failed, as_version=4).cells[-1].outputs)          # kept for debugging
    assert (dest / 'fake.ipynb').read_bytes() == before                                  # the last good report, untouched
    assert (dest / 'README.md').read_text() == 'report first' and (dest / 'table.csv').read_text() == 'tag\nfirst\n'
    assert sorted(p.name for p in (dest / 'runs').iterdir()) == ['first.json', 'second.json']   # the record landed in the real runs/
    assert sorted(p.name for p in dest.iterdir()) == ['README.md', 'fake.ipynb', 'runs', 'table.csv']
