#!/usr/bin/env python
"""The study configuration's speed options (issue 33), through `python benchmarks/step.py --study`: where the time of an
Open Clip Art study run goes, and what each option would give, measured in one process (one run) on this CPU.

    python benchmarks/step.py --study            # ~25 min on the 2-core CPU (bf16 and compile are slow to measure here)
    python benchmarks/step.py --study --quick    # ~1 min smoke: batch 16, 32 px, no compile / bf16 cases

The study configuration: vit-tiny + text-tiny, 64 px, context 32, batch 64, CLIP and DeCLIP (two views, two texts,
MLM, nearest-neighbour queue), fp32, one torch thread per run, two runs at once on the 2 cores (`declip.study.run_grid`,
`jobs=2, threads=1`), data read in the training process (`workers=0`), a validation evaluation every 120 steps.

1. Options, interleaved (A B C A B C ...), median process CPU time per step at one thread: the trainer's step
   (`declip.step.train_step`) of models built from the same seed on the same batch. Each option's loss at steps 1 and
   2 against fp32 eager's: 0 means bitwise the same arithmetic.
2. Thread layout: one process with 2 threads against two processes with 1 thread each (the study runner's way), each
   timed by wall clock over the same steps; samples/s per core.
3. Where the time goes in one step of a study run: forward, backward and optimiser (timed apart, fp32 eager), the data
   of one batch read in the process (Open Clip Art's training pipeline when its prepared cache is here, else the
   synthetic one), and the evaluation amortised over `eval_every` steps (the validation sets read from files each time,
   as before, or prepared once per run, `evaluation.prepare_eval_sets`); the step's counted FLOPs against this core's
   fp32 matrix-multiply rate (how close to the hardware the step already is).
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as bench

ROOT = bench.ROOT
STUDY = dict(image_encoder='vit-tiny', text_encoder='text-tiny', image_size=64, context_length=32, batch=64)
QUICK = dict(STUDY, image_size=32, batch=16)
# label -> what differs from fp32 eager (the trainer's step: fused AdamW, fp32, eager)
OPTIONS = {'fp32 eager (today)': {}, 'foreach AdamW': dict(optimizer='foreach'), 'bf16 autocast': dict(precision='bf16'),
           'compile': dict(compiled=True), 'compile + bf16': dict(compiled=True, precision='bf16')}
QUICK_OPTIONS = ('fp32 eager (today)', 'foreach AdamW')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--study', action='store_true', help="(the flag step.py dispatches on)")
    p.add_argument('--quick', action='store_true', help="~1 min smoke: batch 16, 32 px, 1 rep, no compile / bf16")
    p.add_argument('--methods', default='clip,declip')
    p.add_argument('--options', default=None, help=f"comma list of {list(OPTIONS)} (default: all; --quick: {QUICK_OPTIONS})")
    p.add_argument('--reps', type=int, default=None, help="timed steps per option (default 5 fp32 / 3 bf16; --quick 1)")
    p.add_argument('--eval_every', type=int, default=120, help="the study's steps between evaluations")
    p.add_argument('--layout_steps', type=int, default=None, help="timed steps per process in the thread-layout test (default 6)")
    p.add_argument('--report', default=str(bench.REPORT), help="report path without extension: the block goes into <report>.md")
    p.add_argument('--section', default='cpu-study')
    p.add_argument('--report_mode', default='replace', choices=('replace', 'off'))
    p.add_argument('--layout_worker', default=None, help=argparse.SUPPRESS)   # internal: one process of the layout test
    p.add_argument('--threads', type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _loss_step(case):
    "The trainer's step of `case`; its loss."
    from declip.models import METHODS
    from declip.step import train_step
    out, finite, _ = train_step(case.model, [case.batch], case.opt, bench.LR, precision=case.precision,
                                logit_scale_clamp=METHODS[case.base].logit_scale_clamp, fwd=case.fwd)
    return out['loss'].item()


def options(methods, labels, cfg, reps):
    "Rows: method, option, median CPU s per step, samples/s per core, ratio to fp32 eager, loss differences at steps 1, 2."
    import torch
    dev, rows = torch.device('cpu'), []
    for method in methods:
        cases = {}
        for label in labels:
            kw = dict(OPTIONS[label]); precision = kw.pop('precision', 'fp32')
            c = bench.Case(STUDY_ARCH, method, dict(cfg), dev, precision, label=label, **kw)
            t0 = time.time(); c.build()
            c.losses = [_loss_step(c), _loss_step(c)]                 # steps 1 and 2 (and the compile, when compiled)
            c.first_s = time.time() - t0
            cases[label] = c
            print(f"   {method:7s} {label:20s} ready in {c.first_s:6.1f} s; losses {c.losses}", flush=True)
        for r in range(max(reps.values())):
            for label, c in cases.items():
                if r < reps[c.precision]:
                    t = time.process_time(); _loss_step(c); c.cpus.append(time.process_time() - t)
        base = cases[labels[0]]
        for label, c in cases.items():
            s = bench.median(c.cpus)
            rows.append(dict(method=method, option=label, step_cpu_s=s, samples_per_s_per_core=cfg['batch'] / s,
                             ratio=bench.median(base.cpus) / s, first_steps_s=c.first_s, reps=len(c.cpus),
                             loss_diff_1=abs(c.losses[0] - base.losses[0]), loss_diff_2=abs(c.losses[1] - base.losses[1])))
            print(f"   {method:7s} {label:20s} {s:8.3f} s/step  x{rows[-1]['ratio']:.3f}  loss diff {rows[-1]['loss_diff_1']:.2e} "
                  f"{rows[-1]['loss_diff_2']:.2e}", flush=True)
        for c in cases.values(): c.free()
    return rows

STUDY_ARCH = 'vit-tiny'


def sgemm_gflops(cfg, reps=20):
    "This core's fp32 matrix-multiply rate (GFLOP/s, one thread) at the image tower's MLP shape: (batch x tokens) x 192 x 768."
    import torch
    m = cfg['batch'] * ((cfg['image_size'] // 8) ** 2 + 1)                # vit-tiny: patch 8, one class token, width 192
    a, b = torch.randn(m, 192), torch.randn(192, 768)
    for _ in range(3): a @ b
    t = time.process_time()
    for _ in range(reps): a @ b
    return 2 * m * 192 * 768 / ((time.process_time() - t) / reps) / 1e9


def phases(method, cfg, reps):
    "Median CPU seconds of forward, backward and optimiser of the fp32 eager step (timed apart), and its counted GFLOP."
    import torch
    c = bench.Case(STUDY_ARCH, method, dict(cfg), torch.device('cpu'), 'fp32'); c.build(); _loss_step(c)
    flops, _ = c.count(flops=True, audit=False)
    t = {'forward': [], 'backward': [], 'optimiser': []}
    for _ in range(reps):
        c.model.train()
        a = time.process_time(); out = c.model(c.batch)
        b = time.process_time(); out['loss'].backward()
        d = time.process_time(); c.opt.step(); c.opt.zero_grad(set_to_none=True)
        e = time.process_time()
        t['forward'].append(b - a); t['backward'].append(d - b); t['optimiser'].append(e - d)
    c.free()
    return {k: bench.median(v) for k, v in t.items()} | dict(gflop=flops / 1e9)


def _study_data(quick):
    "(train spec, eval spec, what it is): Open Clip Art when its prepared cache or the package is here, else synthetic."
    try:
        from declip.openclipart import prepare_openclipart
        prepare_openclipart(progress=True)
        return 'openclipart', 'openclipart:split=val', 'Open Clip Art (prepared 128-px cache), validation split'
    except FileNotFoundError:
        return 'synthetic', 'synthetic:n_per_class=4,n_retrieval=200' if quick else 'synthetic', 'synthetic benchmark (no Open Clip Art here)'


def data_seconds(method, spec, cfg, n):
    "CPU seconds of one batch of the training pipeline read in the process (workers=0, as study runs read it)."
    import torch
    from declip.pipeline import open_train_data, parse_data_spec, reader_defaults, SamplePipeline, TrainData
    from declip.models import create_model
    s = parse_data_spec(spec)
    reader = open_train_data(s, **reader_defaults(s, cfg['image_size'], 0, 1, 0, 0))
    req = create_model(method, nn_queue_size=64).data_requirements()
    data = TrainData(reader, SamplePipeline(req['image_views'], cfg['image_size'], text_aug=req['text_aug'], mlm=req['mlm'],
                                            context_length=cfg['context_length']))
    data[(0, 0)]
    t = time.process_time()
    for i in range(1, n + 1): data[(0, i)]
    return (time.process_time() - t) / n * cfg['batch']


def eval_seconds(method, spec, cfg):
    "CPU seconds of one evaluation: the sets read from files (as before), the sets prepared once (and what preparing costs); equal results."
    import torch
    from declip.models import create_model
    from declip.evaluation import open_eval_sets, evaluate_sets, prepare_eval_sets, resolve_transform
    m = create_model(method, image_encoder=cfg['image_encoder'], text_encoder=cfg['text_encoder'], image_size=cfg['image_size'],
                     context_length=cfg['context_length'], nn_queue_size=64)
    sets = open_eval_sets(spec, cfg['image_size'])
    t = time.process_time(); before = evaluate_sets(m, sets); files = time.process_time() - t
    t = time.process_time(); ready = prepare_eval_sets(sets, resolve_transform(m, None)); prep = time.process_time() - t
    t = time.process_time(); after = evaluate_sets(m, ready); cached = time.process_time() - t
    assert before == after, 'prepared sets must give the same numbers'
    return dict(files=files, prepared=cached, prepare_once=prep, images=sum(len(s) for s in sets.values()))


def layout_worker(method, threads, steps, cfg):
    "One process of the layout test: samples/s by wall clock over `steps` fp32 eager steps at `threads` threads."
    import torch
    torch.set_num_threads(threads)
    c = bench.Case(STUDY_ARCH, method, dict(cfg), torch.device('cpu'), 'fp32'); c.build(); _loss_step(c)
    t = time.perf_counter()
    for _ in range(steps): _loss_step(c)
    print(json.dumps(dict(samples_per_s=steps * cfg['batch'] / (time.perf_counter() - t))), flush=True)


def layout(method, steps, quick):
    "Samples/s per core: one process with 2 threads, and two processes with 1 thread each at once."
    def start(threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, str(Path(__file__).resolve().parent / 'step.py'), '--study', '--layout_worker', method,
               '--threads', str(threads), '--layout_steps', str(steps)] + (['--quick'] if quick else [])
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    def rate(p):
        out, _ = p.communicate(); assert p.returncode == 0, f'layout worker failed: {out}'
        return json.loads(out.strip().splitlines()[-1])['samples_per_s']
    one = rate(start(2))
    pair = [start(1), start(1)]; two = sum(rate(p) for p in pair)
    return dict(method=method, one_process_2_threads=one / 2, two_processes_1_thread=two / 2, ratio=two / one)


def block(meta, rows, lay, where, cfg, note):
    "The report block (markdown)."
    L = [f"### Study configuration: {meta['section']} ({meta['date']})", '',
         f"- device: {meta['device']}; torch {meta['torch']} (CPU capability {meta['capability']}); one torch thread per case",
         f"- git commit: `{meta['git_commit']}`; command: `{meta['command']}`; wall time {meta['wall_s']:.0f} s",
         f"- configuration: vit-tiny + text-tiny, {cfg['image_size']} px, context {cfg['context_length']}, batch {cfg['batch']}; "
         f"data and evaluation: {note}", '',
         '**Options** (median CPU seconds per step; ratio = fp32 eager / option, > 1 is faster; loss difference to fp32 eager '
         'at steps 1 and 2, 0 = the same arithmetic bit for bit):', '',
         '| method | option | s / step | samples/s per core | ratio | loss diff, step 1 | step 2 | first two steps (s) |',
         '|---|---|---|---|---|---|---|---|']
    for r in rows:
        L.append(f"| {r['method']} | {r['option']} | {r['step_cpu_s']:.3f} | {r['samples_per_s_per_core']:.1f} | {r['ratio']:.3f} | "
                 f"{r['loss_diff_1']:.1e} | {r['loss_diff_2']:.1e} | {r['first_steps_s']:.0f} |")
    L += ['', '- channels-last: does not apply (a ViT tower; the trainer already puts ResNet towers in channels-last).', '',
          '**Thread layout** (fp32 eager, wall clock; samples/s per core):', '',
          '| method | one process, 2 threads | two processes, 1 thread each | two / one |', '|---|---|---|---|']
    for r in lay: L.append(f"| {r['method']} | {r['one_process_2_threads']:.1f} | {r['two_processes_1_thread']:.1f} | {r['ratio']:.3f} |")
    L += ['', f"**Where a study run's time goes** (CPU seconds per optimiser step at one thread; the evaluation amortised over "
          f"{meta['eval_every']} steps; share of the step in brackets):", '',
          '| method | forward | backward | optimiser | data (in the process) | evaluation, files each time | evaluation, prepared once | '
          'step total, today | step total, prepared evaluation | ratio |', '|---|---|---|---|---|---|---|---|---|---|']
    for w in where:
        today = w['forward'] + w['backward'] + w['optimiser'] + w['data'] + w['eval_files']
        now = today - w['eval_files'] + w['eval_prepared']
        pct = lambda x: f"{x:.3f} ({x / today:.0%})"
        L.append(f"| {w['method']} | {pct(w['forward'])} | {pct(w['backward'])} | {pct(w['optimiser'])} | {pct(w['data'])} | "
                 f"{pct(w['eval_files'])} | {pct(w['eval_prepared'])} | {today:.3f} | {now:.3f} | {today / now:.3f} |")
    for w in where:
        step = w['forward'] + w['backward'] + w['optimiser']
        L.append(f"- {w['method']}: {w['gflop']:.1f} GFLOP per step (forward + backward, counted), {w['gflop'] / step:.1f} GFLOP/s "
                 f"over forward + backward + optimiser; this core multiplies fp32 matrices of the image tower's MLP shape at "
                 f"{meta['sgemm_gflops']:.1f} GFLOP/s (one thread): the step runs at {w['gflop'] / step / meta['sgemm_gflops']:.0%} of that")
    L += [f"- one evaluation ({where[0]['eval_images']} images): from files {where[0]['eval_files_s']:.2f} s, prepared "
          f"{where[0]['eval_prepared_s']:.2f} s (preparing them once: {where[0]['prepare_once_s']:.2f} s); the same numbers "
          f"bit for bit (asserted)"]
    return '\n'.join(L) + '\n'


def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else STUDY
    if args.layout_worker:
        return layout_worker(args.layout_worker, args.threads, args.layout_steps or 2, cfg)
    import torch
    torch.set_num_threads(1)
    t0 = time.time()
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    labels = [l.strip() for l in args.options.split(',')] if args.options else list(QUICK_OPTIONS if args.quick else OPTIONS)
    unknown = [l for l in labels if l not in OPTIONS]
    if unknown: sys.exit(f"--options: unknown {unknown}; expected some of {list(OPTIONS)}")
    if labels[0] != 'fp32 eager (today)': labels = ['fp32 eager (today)'] + [l for l in labels if l != 'fp32 eager (today)']
    reps = dict(fp32=args.reps or (1 if args.quick else 5), bf16=args.reps or (1 if args.quick else 3))
    print(f"== study configuration: {cfg}, options {labels}", flush=True)
    rows = options(methods, labels, cfg, reps)
    print("== thread layout", flush=True)
    lay = [layout(m, args.layout_steps or (2 if args.quick else 6), args.quick) for m in methods]
    for r in lay: print(f"   {r}", flush=True)
    print("== where the time goes", flush=True)
    train_spec, eval_spec, note = _study_data(args.quick)
    where = []
    for m in methods:
        ph = phases(m, cfg, 1 if args.quick else 5)
        ev = eval_seconds(m, eval_spec, cfg)
        where.append(dict(method=m, **ph, data=data_seconds(m, train_spec, cfg, 32 if args.quick else 400),
                          eval_files=ev['files'] / args.eval_every, eval_prepared=ev['prepared'] / args.eval_every,
                          eval_files_s=ev['files'], eval_prepared_s=ev['prepared'], prepare_once_s=ev['prepare_once'], eval_images=ev['images']))
        print(f"   {where[-1]}", flush=True)
    meta = bench.make_meta(torch.device('cpu'), 1, 'fp32')
    meta.update(section=args.section, wall_s=time.time() - t0, eval_every=args.eval_every, capability=torch.backends.cpu.get_cpu_capability(),
                sgemm_gflops=sgemm_gflops(cfg))
    text = block(meta, rows, lay, where, cfg, note)
    print('\n' + text)
    if args.report_mode != 'off':
        md = Path(args.report + '.md'); md.parent.mkdir(parents=True, exist_ok=True)
        tag = f"section={args.section}"
        bench.write_block(md, f"<!-- BEGIN study_speed.py {tag} -->", f"<!-- END study_speed.py {tag} -->", text, 'replace')
        Path(args.report + f'-{args.section}.json').write_text(json.dumps(dict(meta=meta, options=rows, layout=lay, where=where), indent=1))
        print(f"wrote {md} (section {tag!r}) and {args.report}-{args.section}.json")


if __name__ == '__main__':
    main()
