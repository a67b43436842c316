#!/usr/bin/env python
"""Before/after measurements of the performance changes, each in one process with interleaved steps (A B A B ...).

    python benchmarks/ab.py --before git:46f0ec928783           # the models/losses before issue 7's changes
    python benchmarks/ab.py --before git:46f0ec928783 --quick

"before" code is loaded from a git revision (or a directory holding a copy of the `declip` package) as a second
package, `declip_before`, beside the working tree's `declip`; both build the same weights (same seed), and each
experiment first checks that the variants give the same losses on the same batch. Step = the trainer's step, as in
`benchmarks/step.py` (whose `Case` this reuses). CPU step time = median process CPU time, 1 thread by default.
"""
import argparse, datetime, importlib, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as bench

ROOT = bench.ROOT

# name -> (what changed, [(arch, variant label, method, Case kwargs)], [(ratio label, numerator, denominator)])
def experiments(quick):
    big = [] if quick else ['vit-b32']
    E = {}
    E['mlm_count'] = ("MLM head on the host-counted masked rows (`mlm_count`, rounded up to 8) instead of a fixed "
                      "budget of 0.3 x B x L positions (losses.mlm_loss, models.DeCLIP.forward, random_batch / trainer)",
                      [(a, v, 'declip', kw) for a in ['vit-tiny'] + big
                       for v, kw in (('before', dict(pkg='declip_before', optimizer='default')), ('after', dict(optimizer='default')))],
                      [('after / before', 'after', 'before')])
    E['nt_xent_mask'] = ("SLIP's NT-Xent self mask by comparison instead of F.one_hot (one_hot checks its range with two "
                         "host syncs on CPU)",
                         [('vit-tiny', v, 'slip', kw) for v, kw in (('before', dict(pkg='declip_before', optimizer='default')), ('after', dict(optimizer='default')))],
                         [('after / before', 'after', 'before')])
    E['fused_adamw_cpu'] = ("AdamW with `fused=True` on the CPU too (torch's default there is the per-parameter loop; "
                            "train.make_optimizer)",
                            [(a, f'{m} {v}', m, dict(optimizer=o)) for a in ['vit-tiny'] + big for m in ('clip', 'declip')
                             for v, o in (('before', 'default'), ('after', 'fused'))],
                            [(f'{m} after / before', f'{m} after', f'{m} before') for m in ('clip', 'declip')])
    E['channels_last_rn50'] = ("channels_last for the ResNet tower (what the trainer does) vs the default layout",
                               [('rn50', v, 'clip', dict(channels_last=cl)) for v, cl in (('contiguous', False), ('channels_last', True))],
                               [('channels_last / contiguous', 'channels_last', 'contiguous')]) if not quick else None
    E['all'] = ("everything together: DeCLIP / CLIP step ratio before and after",
                [(a, f'{m} {v}', m, kw) for a in ['vit-tiny'] + big for m in ('clip', 'declip')
                 for v, kw in (('before', dict(pkg='declip_before', optimizer='default')), ('after', {}))],
                [('declip / clip, before', 'declip before', 'clip before'), ('declip / clip, after', 'declip after', 'clip after'),
                 ('declip after / before', 'declip after', 'declip before'), ('clip after / before', 'clip after', 'clip before')])
    return {k: v for k, v in E.items() if v is not None}


def prepare_before(spec, name='declip_before'):
    "Materialise the `declip` package of a git revision ('git:REV') or a directory as the importable package `name`."
    root = Path(tempfile.mkdtemp(prefix='declip_before_')); d = root / name; d.mkdir()
    if spec.startswith('git:'):
        rev = spec[4:]
        ls = subprocess.run(['git', 'ls-tree', '--name-only', f'{rev}:declip'], cwd=ROOT, capture_output=True, text=True)
        if ls.returncode: sys.exit(f"--before {spec}: {ls.stderr.strip()}")
        for f in ls.stdout.split():
            if f.endswith('.py'):
                (d / f).write_text(subprocess.run(['git', 'show', f'{rev}:declip/{f}'], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    else:
        src = Path(spec)
        if not (src / 'models.py').exists(): sys.exit(f"--before {spec}: expected a directory holding a copy of the declip package")
        for f in src.glob('*.py'): shutil.copy(f, d / f.name)
    for f in d.glob('*.py'):
        t = f.read_text()
        t = re.sub(r'\bfrom declip\.', f'from {name}.', t); t = re.sub(r'\bfrom declip import\b', f'from {name} import', t)
        f.write_text(t)
    sys.path.insert(0, str(root))
    importlib.import_module(f'{name}.models')
    return root


def same_losses(cases):
    "Max |difference| of each named loss between variants of the same method (eval mode: no queue update, BN fixed)."
    import torch
    out, by_method = {}, {}
    for c in cases:
        m = c.model; was = m.training; m.eval()
        with torch.no_grad(): o = m(c.batch)
        m.train(was)
        by_method.setdefault(c.method, []).append({k: float(v) for k, v in o['losses'].items()})
    for method, ls in by_method.items():
        if len(ls) > 1: out[method] = max(abs(l[k] - ls[0][k]) for l in ls[1:] for k in ls[0])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--before', required=True, help="git:REV or a directory with a copy of the declip package (the 'before' code)")
    p.add_argument('--only', default=None, help="comma list of experiments")
    p.add_argument('--quick', action='store_true', help="tiny models only, fewer repetitions")
    p.add_argument('--reps', type=int, default=None, help="timed steps per variant (default 7 tiny / 3 big; quick 5)")
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--report', default=str(bench.REPORT))
    p.add_argument('--report_mode', default='replace', choices=('replace', 'off'))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    prepare_before(args.before)
    import logging; logging.getLogger().setLevel(logging.ERROR)
    dev = torch.device('cpu')
    E = experiments(args.quick)
    if args.only: E = {k: v for k, v in E.items() if k in args.only.split(',')}
    t0 = time.time(); rows = []
    for name, (what, variants, ratios) in E.items():
        print(f"\n== {name}: {what}", flush=True)
        for arch in dict.fromkeys(v[0] for v in variants):
            a = dict(bench.ARCHS[arch]); big = arch != 'vit-tiny'
            reps = args.reps or (5 if args.quick else (3 if big else 7))
            cases = [bench.Case(arch, method, a, dev, 'fp32', label=label, **kw) for ar, label, method, kw in variants if ar == arch]
            for c in cases: c.build()
            diff = same_losses(cases)                  # before any optimizer step: the variants hold the same weights
            for c in cases: c.step()                   # warm-up
            for r in range(reps):
                for c in cases: c.timed_step()
            med = {c.label: bench.median(c.cpus) for c in cases}
            for c in cases:
                rows.append(dict(experiment=name, arch=arch, variant=c.label, step_s=med[c.label], batch=a['batch'], reps=reps))
                print(f"   {arch:9s} {c.label:16s} {med[c.label]:.4f} s (CPU, median of {reps})", flush=True)
            for label, num, den in ratios:
                if num in med and den in med:
                    rows.append(dict(experiment=name, arch=arch, ratio=label, value=med[num] / med[den], loss_diff=diff))
                    print(f"   {arch:9s} {label}: {med[num] / med[den]:.3f}   (max loss difference between variants: {diff})", flush=True)
            for c in cases: c.free()
    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), device=bench.device_name(dev),
                torch=torch.__version__, git_commit=bench.git_commit(), threads=args.threads,
                command='python ' + ' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), wall_s=round(time.time() - t0, 1))
    L = [f"### Before/after measurements ({meta['date']})", '',
         f"- device: {meta['device']}; torch {meta['torch']}; {meta['threads']} torch thread(s); fp32; git commit `{meta['git_commit']}`; "
         f"before = `{args.before}`", f"- command: `{meta['command']}`; wall time {meta['wall_s']} s",
         "- step = the trainer's step (forward, backward, isfinite check, AdamW, clamp); time = median process CPU time per step, "
         "variants interleaved in one process; batch 64 / 64 px / context 32 (vit-tiny + text-tiny), 8 / 224 px / 77 (vit-b32 + text-base, rn50 + text-base)", '',
         '| experiment | arch | ratio | value | max loss difference between variants |', '|---|---|---|---|---|']
    for r in rows:
        if 'ratio' in r: L.append(f"| {r['experiment']} | {r['arch']} | {r['ratio']} | {r['value']:.3f} | {r['loss_diff']} |")
    L += ['', '| experiment | arch | variant | step (s) |', '|---|---|---|---|']
    for r in rows:
        if 'variant' in r: L.append(f"| {r['experiment']} | {r['arch']} | {r['variant']} | {r['step_s']:.4f} |")
    L += ['', 'What each experiment changes:', ''] + [f"- `{k}`: {v[0]}" for k, v in E.items()]
    block = '\n'.join(L) + '\n'
    print('\n' + block)
    if args.report_mode != 'off':
        md = Path(args.report + '.md'); md.parent.mkdir(parents=True, exist_ok=True)
        bench.write_block(md, '<!-- BEGIN ab.py -->', '<!-- END ab.py -->', block, 'replace')
        print(f"wrote {md}")

if __name__ == '__main__':
    main()
