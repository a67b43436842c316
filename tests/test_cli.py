"""The command lines as a user meets them: `declip-train`'s closing summary and hidden test hook, `declip-export`.

Each run is a separate process on the CPU with one thread: the `clip` preset with the tiny encoders, 32-pixel images
and the embedded synthetic data.
"""
import configparser, importlib, json, re, subprocess, sys
from pathlib import Path

import torch

from helpers import DECLIP_TRAIN, cpu_env, load_ckpt, run_ok, train_args

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(method='clip', image_encoder='vit-tiny', train_data='synthetic:size=32', batch_size=8, max_steps=4, image_size=32, log_every=1)
EVAL = 'synthetic:n_per_class=2,n_retrieval=8'


def declip_export():
    "The installed `declip-export`, or its entry point run by this Python (a checkout installed before the script existed)."
    exe = Path(sys.executable).parent / 'declip-export'
    return [str(exe)] if exe.exists() else [sys.executable, '-c', 'import sys; from declip.runs import export_cli; sys.exit(export_cli())']


def test_console_scripts_are_registered():
    "settings.ini (what setup.py reads) registers every command, each naming a function that exists."
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    scripts = dict(s.split('=', 1) for s in cfg['DEFAULT']['console_scripts'].split())
    assert {'declip-train', 'declip-reports', 'declip-export'} <= set(scripts), scripts
    for name, target in scripts.items():
        module, func = target.split(':')
        assert callable(getattr(importlib.import_module(module), func, None)), (name, target)


def test_train_ends_with_a_closing_summary_then_export_and_refused_resume(workdir):
    "A tiny run prints where it is, how much it trained, its final evaluation and its checkpoints; its export loads but cannot resume."
    out = workdir / 'run'
    p = run_ok(train_args(output_dir=out, **dict(TINY, eval_data=EVAL, progress=True)), timeout=240)
    said = p.stdout
    bars = p.stderr.replace('\r', '\n')                             # tqdm redraws its lines with carriage returns
    assert 'train: 100%' in bars, bars[-2000:]
    assert re.search(r'images: +\d+%\|', bars) and re.search(r'texts: +\d+%\|', bars), bars[-2000:]   # evaluation shows its progress
    assert said.startswith('declip-train: finished clip: 4 steps ('), said
    assert '32 samples in ' in said and f'output folder: {out}' in said
    rows = {l.split()[0]: l.split()[1:] for l in said.splitlines() if l.startswith('    ')}
    assert rows['task'] == ['top1', 'top5', 'image_to_text_R@1', 'text_to_image_R@1', 'mean_recall'], said
    assert rows['shape'][0] == 'zero-shot' and rows['retrieval'][0] == 'retrieval', said
    assert f'last.pt: {out}/checkpoints/last.pt (a hard link of step_00000004.pt' in said
    assert f'best.pt: {out}/checkpoints/best.pt' in said and f'declip-export {out}/checkpoints/best.pt' in said

    e = run_ok(declip_export() + [str(out / 'checkpoints' / 'best.pt')], timeout=120)
    weights = out / 'best.weights.pt'
    assert e.stdout.startswith(f'declip-export: wrote {weights} (') and weights.is_file(), e.stdout
    full, w = load_ckpt(out / 'checkpoints' / 'best.pt'), load_ckpt(weights)
    assert 'optimizer' not in w and set(w['model']) == set(full['model']) - set(w['dropped'])
    assert weights.stat().st_size < (out / 'checkpoints' / 'best.pt').stat().st_size

    r = subprocess.run(train_args(output_dir=workdir / 'again', resume=weights, **TINY), env=cpu_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('declip-train: error: ') and 'is a weights-only export' in last and 'checkpoints/last.pt' in last, last
    assert not (workdir / 'again').exists()


def test_train_help_hides_the_test_hook_which_still_works(workdir):
    "`--_stop_after` is not in --help, yet stops a run after that many steps (no summary: it did not finish)."
    h = run_ok([DECLIP_TRAIN, '--help'], timeout=60).stdout
    assert '--seed' in h and '_stop_after' not in h
    out = workdir / 'run'
    p = run_ok(train_args(output_dir=out, save_every=1, _stop_after=2, **dict(TINY, eval_data='')), timeout=240)
    assert 'finished' not in p.stdout and not (out / 'summary.json').exists()
    assert load_ckpt(out / 'checkpoints' / 'last.pt')['step'] == 2


def test_export_refuses_bad_paths_in_one_line(workdir):
    "A missing checkpoint, or an output inside a run's checkpoints/ folder: exit 2, one line naming it."
    r = subprocess.run(declip_export() + [str(workdir / 'nope.pt')], env=cpu_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'nope.pt' in r.stderr, r.stderr
    ck = workdir / 'run' / 'checkpoints'; ck.mkdir(parents=True)
    torch.save(dict(config={}, model={}), ck / 'last.pt')
    r = subprocess.run(declip_export() + [str(workdir / 'run'), '-o', str(ck / 'w.pt')], env=cpu_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "checkpoints/ folder" in r.stderr and not (ck / 'w.pt').exists(), r.stderr


# An export stalled after its bytes are written, before the rename (fsync never returns): killed there, it leaves its
# hidden temporary file, as a kill mid-write does.
STALLED_EXPORT = r'''
import os, sys, time
def stalled(fd): print('WRITING', flush=True); time.sleep(120)
os.fsync = stalled
from declip.runs import export_cli
sys.exit(export_cli())
'''


def test_killed_export_leaves_a_file_the_next_export_removes(workdir):
    """A declip-export killed mid-write leaves `.last.weights.pt.tmp<pid>@<host>`. An export while the writer lives leaves
    that file alone; the next one after the kill removes it (only it) and says so in one line."""
    run = workdir / 'run'; (run / 'checkpoints').mkdir(parents=True)
    torch.save(dict(config=dict(method='clip'), model=dict(w=torch.randn(1_000_000))), run / 'checkpoints' / 'last.pt')
    (run / '.notes.tmp').write_text('not an export')                            # another program's file: not touched
    (workdir / 'stalled.py').write_text(STALLED_EXPORT)
    first = subprocess.Popen([sys.executable, str(workdir / 'stalled.py'), str(run)], env=cpu_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == 'WRITING', first.stderr.read()[-2000:]
        temps = list(run.glob('.last.weights.pt.tmp*'))
        assert len(temps) == 1 and temps[0].name.startswith(f'.last.weights.pt.tmp{first.pid}@'), temps
        r = run_ok(declip_export() + [str(run)], timeout=60)                       # the same file, while the writer lives
        assert temps[0].exists() and 'removed' not in r.stderr, r.stderr
    finally: first.kill(); first.wait()
    assert temps[0].stat().st_size > 4e6                                           # the 4 MB it wrote
    r = run_ok(declip_export() + [str(run)], timeout=60)
    said = [l for l in r.stderr.splitlines() if l.startswith('declip-export')]
    assert len(said) == 1 and said[0].startswith(f'declip-export: removed 1 temporary file(s) left in {run} by export(s) that ended '
                                                 f'before finishing (pid {first.pid}; 4.0 MB): {temps[0].name}'), r.stderr
    assert not temps[0].exists() and sorted(p.name for p in run.iterdir()) == ['.notes.tmp', 'checkpoints', 'last.weights.pt']
    assert r.stdout.startswith(f"declip-export: wrote {run / 'last.weights.pt'} (")


def test_train_evaluates_on_openmoji_and_refuses_to_train_on_it(workdir):
    """`--eval_data openmoji:ROOT:...` (the fake package of `declip.openmoji`) puts the three OpenMoji sets in the final
    evaluation, and `--probe_data transfer:...` linear probes of the final weights on the transfer suite (per-item outputs
    in per_item.json); `--train_data openmoji` is refused in one line (an out-of-distribution test set is never trained on)."""
    from declip.openmoji import write_fake_openmoji
    spec = f"openmoji:{write_fake_openmoji(workdir / 'openmoji')}:cache={workdir / 'openmoji_cache'},progress=false"
    out = workdir / 'run'
    p = run_ok(train_args(output_dir=out, **dict(TINY, max_steps=2, eval_data=spec, probe_data='transfer:shapes:n_per_class=3,image_size=32')),
               timeout=360)
    rows = {l.split()[0]: l.split()[1:] for l in p.stdout.splitlines() if l.startswith('    ')}
    assert rows['openmoji_groups'][0] == 'zero-shot' and rows['openmoji_subgroups'][0] == 'zero-shot', p.stdout
    assert rows['openmoji_retrieval'][0] == 'retrieval', p.stdout
    assert rows['probe.shapes'][:2] == ['linear', 'probe'], p.stdout
    items = json.loads((out / 'per_item.json').read_text())['sets']
    assert {'openmoji_groups', 'probe.shapes'} <= set(items) and len(items['probe.shapes']['true']) == 24, sorted(items)
    assert sorted((workdir / 'openmoji_cache').glob('*/manifest.json')), 'no prepared cache'
    r = subprocess.run(train_args(output_dir=workdir / 'refused', **dict(TINY, train_data=spec)), env=cpu_env(),
                       capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith('declip-train: error: ') and 'openmoji is evaluation-only' in last, r.stderr[-2000:]
    assert not (workdir / 'refused').exists()


def test_bare_declip_reports_lists_the_reports_and_trains_nothing(workdir):
    "`declip-reports` with no names (and no --all, --smoke, --recorded) lists every report and asks for names: exit 2, nothing written."
    from declip.study import REPORTS
    before = sorted(p for p in (Path(__file__).resolve().parent.parent / 'reports').rglob('*'))
    p = subprocess.run([str(Path(DECLIP_TRAIN).parent / 'declip-reports')], env=cpu_env(), capture_output=True, text=True, timeout=120, cwd=workdir)
    assert p.returncode == 2 and 'name the reports to regenerate, or pass --all' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert all(f'  {name} ' in p.stdout for name in REPORTS), p.stdout
    assert sorted(p for p in (Path(__file__).resolve().parent.parent / 'reports').rglob('*')) == before
