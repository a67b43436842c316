#!/usr/bin/env python
"""Peak memory (and time) of one training step: a batch of k*B at once against B x `accum_steps` k (cached features),
and gradient checkpointing off and on. Each configuration runs in a fresh process, so nothing one leaves behind
counts for the next.

    python benchmarks/memory.py                      # CPU: vit-tiny + text-tiny, 64 px, CLIP and DeCLIP, B 256 vs 64 x 4 (~4 min)
    python benchmarks/memory.py --device cuda --arch vit-b32 --batch 512 --accum 4    # on a GPU (benchmarks/gpu.sh)

What is measured, per configuration: the trainer's own `declip.step.train_step` (forward, backward, AdamW), one
untimed step first (it allocates AdamW's state), then one measured step. On CUDA the step's peak is
`max_memory_allocated` during the step minus what was allocated before it. On the CPU it is the growth of the
resident set during the step: `VmHWM - VmRSS` after `malloc_trim` and a reset of the high-water mark
(`/proc/self/clear_refs`), i.e. what the allocator had to take from the system for the step's activations,
gradients and temporaries. Parameters, AdamW state and the batch are counted from the tensors and reported beside
it. The ratios (accumulated / one batch, checkpointing on / off) are within one run of this script.
"""
import argparse, ctypes, datetime, gc, json, os, platform, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
from step import ARCHS, _malloc_trim, _status_kb, _reset_hwm, git_commit, write_block   # one copy of these helpers


def measure(cfg: dict) -> dict:
    "One configuration, in this process: the step's peak memory (MB) above what was alive before it, and its times."
    import torch
    from declip.models import create_model, random_batch, METHODS
    from declip.step import train_step, make_optimizer
    dev = torch.device(cfg['device'])
    torch.set_num_threads(cfg['threads']); torch.manual_seed(0)
    a = ARCHS[cfg['arch']]
    m = create_model(cfg['method'], image_encoder=a['image_encoder'], text_encoder=a['text_encoder'], image_size=a['image_size'],
                     context_length=a['context_length']).to(dev).train()
    if cfg['grad_checkpointing']: m.set_grad_checkpointing(True)
    opt = make_optimizer(m, 1e-4, 0.1, dev)
    k, B = cfg['accum'], cfg['batch'] // cfg['accum']
    batches = [{key: (v.to(dev) if torch.is_tensor(v) else v) for key, v in random_batch(m, B, seed=j).items()} for j in range(k)]
    clamp = METHODS[cfg['method']].logit_scale_clamp
    prec = cfg['precision']
    step = lambda: train_step(m, batches, opt, 1e-4, precision=prec, accum_steps=k, logit_scale_clamp=clamp)
    step()                                                          # AdamW's state, allocator warm-up
    static = sum(t.numel() * t.element_size() for t in list(m.parameters()) + [x for s in opt.state.values() for x in s.values() if torch.is_tensor(x)])
    batch = sum(v.numel() * v.element_size() for b in batches for v in b.values() if torch.is_tensor(v))
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev); torch.cuda.reset_peak_memory_stats(dev); before = torch.cuda.memory_allocated(dev)
        w, c = time.perf_counter(), time.process_time(); step(); torch.cuda.synchronize(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    else:
        gc.collect(); _malloc_trim()
        if not _reset_hwm(): sys.exit('cannot reset the high-water mark (/proc/self/clear_refs): no CPU memory measurement here')
        rss0 = _status_kb('VmRSS')
        w, c = time.perf_counter(), time.process_time(); step()
        peak = (_status_kb('VmHWM') - rss0) / 1024
    return dict(cfg, step_peak_mb=peak, static_mb=static / 2**20, batch_mb=batch / 2**20,
                step_wall_s=time.perf_counter() - w, step_cpu_s=time.process_time() - c)


def configs(args) -> list:
    base = dict(arch=args.arch, batch=args.batch, device=args.device, threads=args.threads, precision=args.precision)
    return [dict(base, method=meth, accum=acc, grad_checkpointing=gc_)
            for meth in args.methods.split(',') for gc_ in (False, True) for acc in (1, args.accum)]


def table(rows) -> list:
    L = ['| method | batch | micro-batch x accum | grad. checkpointing | step peak (MB) | params + AdamW (MB) | batch (MB) | step CPU (s) | step wall (s) |',
         '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        L.append(f"| {r['method']} | {r['batch']} | {r['batch'] // r['accum']} x {r['accum']} | {'on' if r['grad_checkpointing'] else 'off'} | "
                 f"{r['step_peak_mb']:.0f} | {r['static_mb']:.0f} | {r['batch_mb']:.1f} | {r['step_cpu_s']:.2f} | {r['step_wall_s']:.2f} |")
    L += ['', '| method | ratio of step peaks | value | ratio of step CPU times | value |', '|---|---|---|---|---|']
    get = lambda meth, acc, ck: next(r for r in rows if r['method'] == meth and r['accum'] == acc and r['grad_checkpointing'] == ck)
    for meth in dict.fromkeys(r['method'] for r in rows):
        acc = max(r['accum'] for r in rows)
        one, split, ck = get(meth, 1, False), get(meth, acc, False), get(meth, 1, True)
        L.append(f"| {meth} | accum {acc} / one batch | {split['step_peak_mb'] / one['step_peak_mb']:.3f} | accum {acc} / one batch | "
                 f"{split['step_cpu_s'] / one['step_cpu_s']:.3f} |")
        L.append(f"| {meth} | checkpointing on / off | {ck['step_peak_mb'] / one['step_peak_mb']:.3f} | checkpointing on / off | "
                 f"{ck['step_cpu_s'] / one['step_cpu_s']:.3f} |")
    return L


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='vit-tiny', choices=sorted(ARCHS))
    p.add_argument('--methods', default='clip,declip', help='comma list of declip methods')
    p.add_argument('--batch', type=int, default=256, help='the global batch of one step')
    p.add_argument('--accum', type=int, default=4, help='micro-batches of the accumulated configuration')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'))
    p.add_argument('--report', default=str(ROOT / 'reports' / 'performance.md'), help="markdown file to write the block into ('' = none)")
    p.add_argument('--one', help=argparse.SUPPRESS)                 # a configuration as JSON: measure it in this process
    args = p.parse_args(argv)
    if args.one: print(json.dumps(measure(json.loads(args.one)))); return
    started, rows = time.time(), []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for cfg in configs(args):
        out = subprocess.run([sys.executable, __file__, '--one', json.dumps(cfg)], capture_output=True, text=True, env=env)
        if out.returncode: sys.exit(f"{cfg}: failed\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['method']:7s} batch {r['batch']} = {r['batch'] // r['accum']} x {r['accum']}  checkpointing {'on ' if r['grad_checkpointing'] else 'off'}  "
              f"step peak {r['step_peak_mb']:7.0f} MB  cpu {r['step_cpu_s']:6.2f} s", flush=True)
    import torch
    a = ARCHS[args.arch]
    head = [f"### Memory: one batch vs accumulated micro-batches, gradient checkpointing ({datetime.date.today()})", '',
            f"- {args.arch} ({a['image_encoder']} + {a['text_encoder']}, {a['image_size']} px, context {a['context_length']}), "
            f"device {args.device} ({platform.processor() or platform.machine()}), {args.threads} thread(s), {args.precision}; torch {torch.__version__}",
            f"- git commit `{git_commit()}`; command `python benchmarks/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
            f"wall time {time.time() - started:.0f} s",
            '- step peak: what one `train_step` took above what was alive before it (CPU: `VmHWM - VmRSS` after `malloc_trim` and a '
            'reset of the high-water mark; CUDA: `max_memory_allocated - memory_allocated`); each row a fresh process', '']
    block = '\n'.join(head + table(rows)) + '\n'
    print('\n' + block)
    if args.report:
        tag = f"arch={args.arch} device={args.device.split(':')[0]}"
        write_block(Path(args.report), f'<!-- BEGIN memory.py {tag} -->', f'<!-- END memory.py {tag} -->', block, 'replace')
        print(f"wrote {args.report}")


if __name__ == '__main__':
    main()
