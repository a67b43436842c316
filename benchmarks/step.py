#!/usr/bin/env python
"""Training-step benchmark: declip's models against open_clip's CLIP, the DeCLIP family against CLIP, and the data
pipeline against the step, all measured in one process with interleaved repetitions (A B A B ...) and medians.

    python benchmarks/step.py                 # CPU: ~10 CPU-minutes at 1 thread, ~13 min wall on 2 shared cores
                                              # (writes reports/performance.md + .csv)
    python benchmarks/step.py --quick         # ~1-2 min
    python benchmarks/step.py --device cuda --precision bf16 --batch 256 --compile both   # see benchmarks/gpu.sh
    python benchmarks/step.py --study         # the study configuration's speed options (benchmarks/study_speed.py)

What one "step" is: the trainer's own, `declip.step.train_step` (forward under autocast, backward, the
non-finite check `torch.isfinite(loss).item()`, AdamW step with declip's `make_optimizer`: fused, zero_grad,
the method's logit-scale clamp). open_clip's step is open_clip's `train_one_epoch` body: `model(images, texts)`, `ClipLoss`,
backward, the same AdamW, logit-scale clamp to [0, ln 100].

On CPU the step time that the ratios use is the process CPU time (threads fixed by --threads, 1 by default): on a
machine shared with other jobs it does not count the time the process waits for a core, which wall time does.
Wall time is reported beside it. On CUDA the step time is wall time between two synchronisations.

Peak memory of one model's step: parameters + AdamW state + batch (counted from the tensors) + what the step adds
at its peak (activations, gradients, temporaries): on CUDA `max_memory_allocated - memory_allocated` over the step
(so other models alive on the device do not count); on CPU the growth of the resident set size (VmHWM - VmRSS,
after `malloc_trim` and a reset of the high-water mark), an allocator-dependent estimate.
"""
import argparse, csv, ctypes, datetime, gc, io, json, math, os, platform, statistics, subprocess, sys, tempfile, time, traceback
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / 'reports' / 'performance'

# --------------------------------------------------------------------------------------------- architectures
ARCHS = {
    'vit-tiny': dict(open_clip='declip-vit-tiny', image_encoder='vit-tiny', text_encoder='text-tiny', image_size=64,
                     context_length=32, batch=64),
    'vit-b32':  dict(open_clip='ViT-B-32', image_encoder='vit-b32', text_encoder='text-base', image_size=224,
                     context_length=77, batch=8),
    'rn50':     dict(open_clip='RN50', image_encoder='rn50', text_encoder='text-base', image_size=224,
                     context_length=77, batch=8),
}
# open_clip config as close as it gets to declip's vit-tiny + text-tiny: ViT width 192, 4 layers, 3 heads (head
# width 64), patch 8, 64 px; text width 128, 3 layers, 4 heads; joint space 256; the same 49,409-token vocabulary.
# Remaining differences (declip's side): frozen patch embedding, QuickGELU in the text tower, a bias on the text
# projection; open_clip uses GELU in both towers.
OPEN_CLIP_TINY = dict(embed_dim=256,
                      vision_cfg=dict(image_size=64, layers=4, width=192, head_width=64, patch_size=8),
                      text_cfg=dict(context_length=32, vocab_size=49409, width=128, heads=4, layers=3))
METHODS = ('open_clip', 'clip', 'declip', 'slip', 'filip', 'defilip', 'siglip', 'clip/pd0.5', 'declip/pd0.5')
# 'M/pdP': method M with patch dropout P (FLIP: that fraction of the ViT's patch tokens dropped in training; ViT archs only)
LR, WD = 1e-4, 0.1          # values do not matter for speed; kept small so repeated steps stay finite


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto', help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument('--threads', type=int, default=None, help="torch intra-op threads (CPU default 1: robust to other jobs)")
    p.add_argument('--quick', action='store_true', help="~1-2 minute version: fewer reps, batch 32 tiny / 4 big, ViT-B/32 "
                   "only with open_clip, clip, declip (unless --archs / --methods say otherwise)")
    p.add_argument('--archs', default=None, help=f"comma list of {sorted(ARCHS)} (default: all)")
    p.add_argument('--methods', default=None, help=f"comma list of {METHODS} (default: all)")
    p.add_argument('--batch', type=int, default=None, help="batch for every arch (default: 64 tiny, 8 big on CPU, 256 on CUDA)")
    p.add_argument('--image_size', type=int, default=None, help="image size for every arch (default: the arch's)")
    p.add_argument('--context_length', type=int, default=None, help="text length for every arch (default: 32 tiny, 77 big)")
    p.add_argument('--reps', type=int, default=None, help="timed steps per case (default: 7 tiny / 3 big on CPU, 10 on CUDA)")
    p.add_argument('--warmup', type=int, default=None, help="untimed steps per case (default 1 on CPU, 3 on CUDA)")
    p.add_argument('--precision', default=None, choices=('fp32', 'bf16'), help="autocast dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument('--compile', default='off', choices=('off', 'on', 'both'), help="torch.compile the models (both: eager and compiled)")
    p.add_argument('--group', type=int, default=None, help="models alive at once per arch (CPU big archs: 3 to bound RAM)")
    p.add_argument('--no_sync_check', action='store_true', help="leave out the trainer's per-step isfinite(loss).item()")
    p.add_argument('--sync_variant', action='store_true', help="also time declip clip/declip without the per-step .item()")
    p.add_argument('--flops', default='auto', choices=('auto', 'on', 'off'), help="count FLOPs of one step (auto: on)")
    p.add_argument('--peak_flops', type=float, default=None, help="device peak FLOP/s for MFU (CUDA default 989e12: H100/H200 dense bf16)")
    p.add_argument('--audit', default='auto', choices=('auto', 'on', 'off'), help="list ops that sync the host in forward+backward")
    p.add_argument('--pipeline', default='auto', choices=('auto', 'on', 'off'), help="measure the data pipeline (auto: on for CPU runs)")
    p.add_argument('--pipeline_samples', type=int, default=None, help="samples per pipeline measurement")
    p.add_argument('--workers', type=int, default=2, help="DataLoader workers to compare with the step (trainer default 2)")
    p.add_argument('--deadline_s', type=float, default=None, help="start no new arch group after this many seconds")
    p.add_argument('--report', default=str(REPORT), help="report path without extension (.md and .csv are written)")
    p.add_argument('--section', default=None, help="report section id (default: the device type)")
    p.add_argument('--report_mode', default='replace', choices=('replace', 'append', 'off'),
                   help="replace this section's block and rows, append a new block, or write nothing")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- environment
def git_commit():
    try:
        c = subprocess.run(['git', 'rev-parse', '--short=12', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=5)
        d = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return c.stdout.strip() + ('+dirty' if d.stdout.strip() else '') if c.returncode == 0 else 'unknown'
    except Exception: return 'unknown'

def device_name(dev):
    import torch
    if dev.type == 'cuda': return torch.cuda.get_device_name(dev)
    name = platform.processor() or 'cpu'
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): name = line.split(':', 1)[1].strip(); break
    except OSError: pass
    return f"{name} ({os.cpu_count()} logical cores)"

_libc = None
def _malloc_trim():
    global _libc
    try:
        _libc = _libc or ctypes.CDLL('libc.so.6'); _libc.malloc_trim(0)
    except Exception: pass

def _status_kb(key):
    try:
        for line in open('/proc/self/status'):
            if line.startswith(key + ':'): return int(line.split()[1])
    except OSError: return None

def _reset_hwm():
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False


# --------------------------------------------------------------------------------------------- sync audit
def sync_audit_mode():
    "A dispatch mode recording ops that make the host wait for the device (item / data-dependent shapes)."
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    bad = {'_local_scalar_dense', 'nonzero', 'masked_select', 'unique', '_unique2', 'unique_consecutive', 'repeat_interleave', 'equal'}
    class SyncAudit(TorchDispatchMode):
        def __init__(self): super().__init__(); self.hits = {}
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split('.')[0]
            hit = name in bad
            if name in ('index', 'index_put', 'index_put_') and len(args) > 1:
                idx = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
                hit = any(torch.is_tensor(i) and i.dtype == torch.bool for i in idx)
                if hit: name += '(bool mask)'
            if name in ('_to_copy', 'copy_') and args:
                src = args[1] if name == 'copy_' and len(args) > 1 else args[0]
                dst = args[0].device if name == 'copy_' else (kwargs or {}).get('device')
                if torch.is_tensor(src) and src.device.type != 'cpu' and dst is not None and torch.device(dst).type == 'cpu':
                    hit, name = True, 'device->host copy'
            if hit: self.hits[name] = self.hits.get(name, 0) + 1
            return func(*args, **(kwargs or {}))
    return SyncAudit()


# --------------------------------------------------------------------------------------------- cases
class Case:
    "One model + optimizer + batch + step function, for one (arch, method, compiled) combination."
    def __init__(self, arch, method, a, dev, precision, compiled=False, sync_check=True, label=None, pkg='declip',
                 optimizer='trainer', channels_last=True, drop_keys=()):
        self.arch, self.method, self.a, self.dev, self.precision = arch, method, a, dev, precision
        self.compiled, self.sync_check = compiled, sync_check
        # variants for before/after measurements (benchmarks/ab.py): the package that builds the model, the
        # optimizer ('trainer' = declip.step.make_optimizer, 'fused', 'foreach', 'default' = torch's choice), channels_last
        # for convnets (the trainer's default), batch keys to leave out
        self.pkg, self.optimizer, self.channels_last, self.drop_keys = pkg, optimizer, channels_last, tuple(drop_keys)
        self.base, _, pd = method.partition('/pd')                  # the method record, and the patch dropout of a variant
        self.patch_dropout = float(pd or 0)
        self.label = label or (method + (' +compile' if compiled else '') + ('' if sync_check else ' (no .item)'))
        self.walls, self.cpus, self.row = [], [], {}

    def autocast(self):
        import torch
        if self.precision == 'fp32': return nullcontext()
        return torch.autocast(self.dev.type, dtype=torch.bfloat16)

    def make_optimizer(self, m):
        import torch
        from declip.step import make_optimizer, param_groups
        if self.optimizer == 'trainer': return make_optimizer(m, LR, WD, self.dev)
        kw = dict(fused=True) if self.optimizer == 'fused' else dict(foreach=True) if self.optimizer == 'foreach' else {}
        return torch.optim.AdamW(param_groups(m, WD), lr=LR, betas=(0.9, 0.98), eps=1e-8, **kw)

    def build(self):
        import torch, importlib
        models = importlib.import_module(f'{self.pkg}.models')
        a, dev = self.a, self.dev
        torch.manual_seed(0)
        if self.method == 'open_clip': self._build_open_clip()
        else:
            m = models.create_model(self.base, image_encoder=a['image_encoder'], text_encoder=a['text_encoder'],
                                    image_size=a['image_size'], context_length=a['context_length'],
                                    **({'patch_dropout': self.patch_dropout} if self.patch_dropout else {})).to(dev)
            if m.visual.is_convnet and self.channels_last: m.visual.to(memory_format=torch.channels_last)   # as the trainer does
            m.train()
            b = models.random_batch(m, a['batch'])
            for k in self.drop_keys: b.pop(k, None)
            self.model, self.batch = m, {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()}
            self.fwd = torch.compile(m) if self.compiled else m
            self.opt = self.make_optimizer(m)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def _build_open_clip(self):
        import torch, open_clip
        from open_clip.loss import ClipLoss
        from declip.models import create_model, random_batch
        from declip.text import SOT_ID, EOT_ID
        a, dev = self.a, self.dev
        m = open_clip.create_model(a['open_clip'], force_image_size=a['image_size'], force_context_length=a['context_length'],
                                   output_dict=True, load_weights=False).to(dev)
        m.train()
        ref = create_model('clip', image_encoder=a['image_encoder'], text_encoder=a['text_encoder'],
                           image_size=a['image_size'], context_length=a['context_length'])
        b = random_batch(ref, a['batch'])                         # the same images and caption tokens as declip's clip
        del ref
        self.model, self.loss_fn = m, ClipLoss()
        text = b['text'].clone()   # declip's ids: <|mask|> 49406, SOT 49407, EOT 49408; open_clip's: SOT 49406, EOT 49407
        text[text == SOT_ID], text[text == EOT_ID] = 49406, 49407
        self.batch = dict(images=b['images'][:, 0].to(dev), text=text.to(dev))
        self.fwd = torch.compile(m) if self.compiled else m
        self.opt = self.make_optimizer(m)                         # the same AdamW for both libraries

    def forward_loss(self):
        if self.method == 'open_clip':
            o = self.fwd(self.batch['images'], self.batch['text'])
            return self.loss_fn(o['image_features'], o['text_features'], o['logit_scale'])
        return self.fwd(self.batch)['loss']

    def step(self):
        import torch
        from declip.models import METHODS
        from declip.step import train_step, clamp_logit_scale
        if self.method != 'open_clip' and self.sync_check:     # declip: the trainer's step itself
            train_step(self.model, [self.batch], self.opt, LR, precision=self.precision,
                       logit_scale_clamp=METHODS[self.base].logit_scale_clamp, fwd=self.fwd)
            return
        # open_clip's train_one_epoch body; or (sync_check=False) the trainer's step without its per-step .item()
        with self.autocast(): loss = self.forward_loss()
        loss.backward()
        self.opt.step(); self.opt.zero_grad(set_to_none=True)
        if self.method == 'open_clip':
            with torch.no_grad(): self.model.logit_scale.clamp_(0, math.log(100))
        else: clamp_logit_scale(self.model, METHODS[self.base].logit_scale_clamp)

    def fwd_bwd(self):
        with self.autocast(): loss = self.forward_loss()
        loss.backward()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self):
        import torch
        cuda = self.dev.type == 'cuda'
        if cuda: torch.cuda.synchronize(self.dev)
        w, c = time.perf_counter(), time.process_time()
        self.step()
        if cuda: torch.cuda.synchronize(self.dev)
        self.walls.append(time.perf_counter() - w); self.cpus.append(time.process_time() - c)

    def static_bytes(self):
        "Parameters + AdamW state, counted from the tensors."
        import torch
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        n += sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t))
        return n

    def peak_memory_mb(self):
        "Peak memory of one step (see the module docstring for how, per device)."
        import torch
        batch_bytes = sum(v.numel() * v.element_size() for v in self.batch.values() if torch.is_tensor(v))
        if self.dev.type == 'cuda':   # other models may be alive on the device: count this one's part only
            torch.cuda.synchronize(self.dev); torch.cuda.reset_peak_memory_stats(self.dev)
            before = torch.cuda.memory_allocated(self.dev)
            self.step(); torch.cuda.synchronize(self.dev)
            return (torch.cuda.max_memory_allocated(self.dev) - before + self.static_bytes() + batch_bytes) / 2**20
        gc.collect(); _malloc_trim()
        if not _reset_hwm(): return None
        rss0 = _status_kb('VmRSS')
        self.step()
        hwm = _status_kb('VmHWM')
        if rss0 is None or hwm is None: return None
        return (self.static_bytes() + batch_bytes) / 2**20 + max(0, hwm - rss0) / 1024

    def cuda_syncs(self):
        "Host-device synchronisations in one whole step (the trainer's .item() included), by CUDA's sync debug mode."
        import torch, warnings
        torch.cuda.synchronize(self.dev)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try: self.step()
            finally: torch.cuda.set_sync_debug_mode('default')
        return sum('synchroniz' in str(x.message).lower() for x in w)

    def count(self, flops=True, audit=True):
        "FLOPs of forward + backward (FlopCounterMode) and the host-syncing ops of that pass."
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        fc = FlopCounterMode(display=False) if flops else nullcontext()
        au = sync_audit_mode() if audit else nullcontext()
        eager = self.fwd
        self.fwd = getattr(self.fwd, '_orig_mod', self.fwd)      # count the eager model (same math)
        try:
            with fc, au: self.fwd_bwd()
        finally: self.fwd = eager
        return (fc.get_total_flops() if flops else None), (dict(au.hits) if audit else None)

    def free(self):
        for k in ('model', 'fwd', 'opt', 'batch', 'loss_fn'): self.__dict__.pop(k, None)


# --------------------------------------------------------------------------------------------- the pipeline
def pipeline_rates(sizes, n, methods=('declip', 'clip')):
    "Samples per CPU-second of one process (= one DataLoader worker, 1 torch thread) for the full per-sample pipeline."
    import torch
    from declip.pipeline import SamplePipeline, TrainData
    from declip.synthetic import SyntheticImageText
    from declip.models import create_model
    old = torch.get_num_threads(); torch.set_num_threads(1)
    out = []
    try:
        for method in methods:
            req = create_model(method).data_requirements()
            for size in sizes:
                reader = SyntheticImageText(size=max(10_000, n + 2), seed=0, image_size=size)
                data = TrainData(reader, SamplePipeline(req['image_views'], size, text_aug=req['text_aug'], mlm=req['mlm']))
                data[(0, 0)]                                      # warm-up: tokenizer, WordNet
                t0 = time.process_time()
                for i in range(1, n + 1): data[(0, i)]
                full = n / (time.process_time() - t0)
                out.append(dict(method=method, image_size=size, views=len(req['image_views']), samples_per_s_per_worker=full))
    finally: torch.set_num_threads(old)
    return out


# --------------------------------------------------------------------------------------------- running
def median(x): return statistics.median(x) if x else float('nan')

def make_meta(dev, threads, precision):
    import torch
    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), device=device_name(dev),
                device_type=dev.type, torch=torch.__version__, git_commit=git_commit(), threads=threads,
                command='python ' + ' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), precision=precision,
                wall_s=0., python=platform.python_version())
    try:
        import open_clip as oc, timm; meta.update(open_clip=oc.__version__, timm=timm.__version__)
    except Exception: pass
    return meta

def run(args, progress=None):
    "Measure everything `args` asks for; `progress(meta, results, pipeline, ratios, notes)` is called after each arch."
    import torch
    dev = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else ('cpu' if args.device == 'auto' else args.device))
    if dev.type == 'cuda' and not torch.cuda.is_available(): sys.exit(f"--device {args.device}: CUDA is not available here")
    cuda = dev.type == 'cuda'
    threads = args.threads or (1 if not cuda else torch.get_num_threads())
    torch.set_num_threads(threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precision = args.precision or ('bf16' if cuda else 'fp32')
    quick_big = args.quick and args.archs is None and args.methods is None   # --quick: ViT-B/32 with the targets' methods only
    archs = [a.strip() for a in (args.archs or ('vit-tiny,vit-b32' if quick_big else ','.join(ARCHS))).split(',') if a.strip()]
    methods = [m.strip() for m in (args.methods or ','.join(METHODS)).split(',') if m.strip()]
    for a in archs:
        if a not in ARCHS: sys.exit(f"--archs: unknown arch {a!r}; expected some of {sorted(ARCHS)}")
    for m in methods:
        if m not in METHODS: sys.exit(f"--methods: unknown method {m!r}; expected some of {METHODS}")
    flops = args.flops != 'off'; audit = args.audit != 'off'
    do_pipeline = args.pipeline == 'on' or (args.pipeline == 'auto' and not cuda)
    compiled = {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]

    import open_clip
    d = tempfile.mkdtemp()
    json.dump(OPEN_CLIP_TINY, open(f'{d}/declip-vit-tiny.json', 'w')); open_clip.add_model_config(d)
    import logging; logging.getLogger().setLevel(logging.ERROR)   # "no pretrained weights" warnings

    t_start = time.time()
    meta = make_meta(dev, threads, precision)
    meta['peak_flops'] = args.peak_flops or (989e12 if cuda else None)
    results, pipeline, notes = [], [], []
    try:
        from timm.layers import use_fused_attn
        notes.append(f"attention: timm towers use F.scaled_dot_product_attention: {use_fused_attn()}; declip's text tower always does "
                     "(is_causal=True); open_clip's uses nn.MultiheadAttention with a float causal mask")
    except Exception: pass
    notes.append("batches: `declip.models.random_batch` (random images; 6-word captions; MLM masking p=0.3, i.e. ~1.8 masked "
                 "tokens per caption, counted on the host as the trainer does); open_clip gets the same images (view 1) and tokens")
    for arch in archs:
        if args.deadline_s and time.time() - t_start > args.deadline_s:
            notes.append(f"{arch}: not run (--deadline_s {args.deadline_s:.0f} s reached)"); continue
        a = dict(ARCHS[arch]); big = arch != 'vit-tiny'
        a['batch'] = args.batch or (256 if cuda else (4 if args.quick else a['batch']) if big else (32 if args.quick else a['batch']))
        if args.image_size: a['image_size'] = args.image_size
        if args.context_length: a['context_length'] = args.context_length
        reps = args.reps or (10 if cuda else ((2 if big else 3) if args.quick else (3 if big else 7)))
        warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
        arch_methods = [m for m in methods if (not (quick_big and big) or m in ('open_clip', 'clip', 'declip'))
                        and not ('/pd' in m and ARCHS[arch]['image_encoder'] == 'rn50')]     # no patches to drop in a ResNet
        specs = [(m, c, True) for c in compiled for m in arch_methods]
        if args.sync_variant: specs += [(m, c, False) for c in compiled for m in ('clip', 'declip') if m in arch_methods]
        if args.no_sync_check: specs = [(m, c, False) for m, c, _ in specs]
        group = args.group or (3 if (big and not cuda) else len(specs))
        # the reference (eager declip clip) stays alive; the others come and go in groups
        ref_spec = ('clip', False, not args.no_sync_check)
        others = [s for s in specs if s != ref_spec]
        chunks = [others[i:i + max(1, group - 1)] for i in range(0, len(others), max(1, group - 1))] or [[]]
        ref = Case(arch, 'clip', a, dev, precision, False, ref_spec[2]) if 'clip' in methods else None
        arch_rows = []
        print(f"\n== {arch}: batch {a['batch']}, {a['image_size']} px, context {a['context_length']}, {precision}, "
              f"{reps} reps, device {dev}, {threads} threads", flush=True)
        for ci, chunk in enumerate(chunks):
            cases = ([ref] if ref is not None else []) + [Case(arch, m, a, dev, precision, c, s) for m, c, s in chunk]
            for case in cases:
                if hasattr(case, 'model'): continue
                try:
                    t0 = time.time(); case.build(); case.step()               # first step: optimizer state, compile
                    case.row['first_step_s'] = time.time() - t0
                    for _ in range(max(0, warmup - 1)): case.step()
                    case.row['peak_mb'] = case.peak_memory_mb()
                    if cuda and not case.compiled: case.row['cuda_syncs_per_step'] = case.cuda_syncs()
                    if (flops or audit) and not case.compiled:
                        f, hits = case.count(flops, audit and case.method != 'open_clip')
                        case.row['gflop_per_step'] = f / 1e9 if f else None
                        case.row['host_syncs'] = None if hits is None else (', '.join(f"{k} x{v}" for k, v in sorted(hits.items())) or 'none')
                except Exception as e:
                    case.row['error'] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    traceback.print_exc(); case.free()
                    print(f"   {case.label}: FAILED ({case.row['error']})", flush=True)
            live = [c for c in cases if hasattr(c, 'model')]
            for r in range(reps):                                            # A B C A B C ...
                for case in live: case.timed_step()
            for case in live:
                if case is not ref: case.free()
            for case in cases:
                if case is not ref: arch_rows.append(case)
            gc.collect()
            if cuda: torch.cuda.empty_cache()
        if ref is not None: arch_rows.insert(0, ref); ref.free()
        for case in arch_rows:
            t_cpu, t_wall = median(case.cpus), median(case.walls)
            t = t_wall if cuda else t_cpu
            row = dict(arch=arch, method=case.method, label=case.label, compiled=case.compiled, sync_check=case.sync_check,
                       batch=a['batch'], image_size=a['image_size'], context_length=a['context_length'], precision=precision,
                       params_m=getattr(case, 'n_params', 0) / 1e6, reps=len(case.walls),
                       step_s=t, step_cpu_s=t_cpu if not cuda else None, step_wall_s=t_wall,
                       samples_per_s=a['batch'] / t if t == t and t > 0 else None, **case.row)
            g = row.get('gflop_per_step')
            if case.compiled:   # same math as the eager model, whose FLOPs were counted
                g = next((x.get('gflop_per_step') for x in results if x['arch'] == arch and x['method'] == case.method and not x['compiled']), None)
                row['gflop_per_step'] = g
            row['achieved_tflops'] = g / 1e3 / t if g and t == t and t > 0 else None
            row['mfu'] = row['achieved_tflops'] * 1e12 / meta['peak_flops'] if (row['achieved_tflops'] and meta['peak_flops']) else None
            results.append(row)
            print(f"   {case.label:28s} step {t:8.4f} s  {row['samples_per_s'] or 0:9.1f} samples/s  "
                  f"peak {row.get('peak_mb') or 0:9.0f} MB  {g or 0:9.1f} GFLOP  syncs: {row.get('host_syncs')}"
                  + (f"  ERROR {row['error']}" if 'error' in row else ''), flush=True)
        if progress is not None:
            meta['wall_s'] = round(time.time() - t_start, 1)
            progress(meta, results, pipeline, compute_ratios(results, pipeline, args.workers, cuda), notes)
    if do_pipeline:
        n = args.pipeline_samples or (60 if args.quick else 300)
        sizes = sorted({ARCHS[x]['image_size'] if not args.image_size else args.image_size for x in archs})
        print(f"\n== data pipeline: {n} samples per measurement, 1 thread, sizes {sizes}", flush=True)
        pipeline = pipeline_rates(sizes, n)
        for p in pipeline:
            print(f"   {p['method']:8s} {p['image_size']:4d} px  {p['samples_per_s_per_worker']:8.1f} samples/s per worker", flush=True)
    meta['wall_s'] = round(time.time() - t_start, 1)
    ratios = compute_ratios(results, pipeline, args.workers, cuda)
    return meta, results, pipeline, ratios, notes


def compute_ratios(results, pipeline, workers, cuda):
    "declip clip / open_clip, each method / declip clip, and (pipeline x workers) / step samples/s."
    out = []
    by = {(r['arch'], r['label']): r for r in results if r.get('step_s') == r.get('step_s') and r.get('step_s')}
    for (arch, label), r in by.items():
        ref_clip = by.get((arch, 'clip'))
        if label == 'clip' and (arch, 'open_clip') in by:
            out.append(dict(arch=arch, ratio='declip clip / open_clip CLIP', value=r['step_s'] / by[(arch, 'open_clip')]['step_s'], target='<= 1.05'))
        if label == 'clip +compile' and (arch, 'open_clip +compile') in by:
            out.append(dict(arch=arch, ratio='declip clip / open_clip CLIP (compiled)', value=r['step_s'] / by[(arch, 'open_clip +compile')]['step_s'], target='<= 1.05'))
        if r['method'] not in ('clip', 'open_clip') and ref_clip and not r['compiled'] and r['sync_check']:
            out.append(dict(arch=arch, ratio=f'declip {label} / declip clip', value=r['step_s'] / ref_clip['step_s'],
                            target='<= 2.3' if r['method'] == 'declip' else ''))
        if r['compiled'] and (arch, r['method']) in by:
            out.append(dict(arch=arch, ratio=f'{r["method"]}: compiled / eager', value=r['step_s'] / by[(arch, r['method'])]['step_s'], target=''))
        if not r['sync_check'] and (arch, r['method']) in by:
            out.append(dict(arch=arch, ratio=f'{r["method"]}: without / with the per-step .item()', value=r['step_s'] / by[(arch, r['method'])]['step_s'], target=''))
    if pipeline:
        for r in results:
            if r['method'] not in ('clip', 'declip') or r['compiled'] or not r.get('samples_per_s') or not r['sync_check']: continue
            p = next((p for p in pipeline if p['method'] == r['method'] and p['image_size'] == r['image_size']), None)
            if p is None: continue
            out.append(dict(arch=r['arch'], ratio=f"{r['method']}: pipeline samples/s ({workers} workers) / step samples/s",
                            value=p['samples_per_s_per_worker'] * workers / r['samples_per_s'], target='> 1'))
    return out


# --------------------------------------------------------------------------------------------- reports
def fmt(v, nd=3):
    if v is None or v == '' or (isinstance(v, float) and v != v): return ''
    if isinstance(v, float): return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)

def markdown_block(meta, results, pipeline, ratios, notes, section):
    cuda = meta['device_type'] == 'cuda' or bool(meta.get('peak_flops'))   # (the GPU table layout)
    L = [f"### Step benchmark: {section} ({meta['date']})", '',
         f"- device: {meta['device']}; torch {meta['torch']}, open_clip {meta.get('open_clip', '?')}, timm {meta.get('timm', '?')}; "
         f"{meta['threads']} torch thread(s); precision {meta['precision']}",
         f"- git commit: `{meta['git_commit']}`; command: `{meta['command']}`; wall time {meta['wall_s']} s",
         ("- step time = median wall time between CUDA synchronisations (CPU: process CPU time); peak memory = parameters + AdamW state + batch + "
          "the step's peak above that (`max_memory_allocated - memory_allocated`); MFU = counted FLOPs (FlopCounterMode, "
          f"forward + backward of the eager model) / step time / {meta.get('peak_flops', 0):.3g} FLOP/s"
          if cuda else
          "- step time = median **process CPU time** per step (robust to other jobs on the machine; wall time beside it); "
          "peak memory = parameters + AdamW state + batch + RSS growth during one step (estimate)"),
         '', '| arch | method | batch | img | ctx | params (M) | step (s) | wall (s) | samples/s | peak MB | GFLOP/step | achieved TFLOP/s |'
         + (' MFU | CUDA syncs per step |' if cuda else '') + ' host-syncing ops in fwd+bwd |',
         '|---|---|---|---|---|---|---|---|---|---|---|---|' + ('---|---|' if cuda else '') + '---|']
    for r in results:
        L.append(f"| {r['arch']} | {r['label']} | {r['batch']} | {r['image_size']} | {r['context_length']} | {fmt(r['params_m'], 1)} | "
                 f"{fmt(r['step_s'], 4)} | {fmt(r['step_wall_s'], 4)} | {fmt(r.get('samples_per_s'), 1)} | {fmt(r.get('peak_mb'), 0)} | "
                 f"{fmt(r.get('gflop_per_step'), 1)} | {fmt(r.get('achieved_tflops'), 4)} |"
                 + (f" {fmt(r['mfu'] * 100 if r.get('mfu') else None, 1)}{'%' if r.get('mfu') else ''} | {fmt(r.get('cuda_syncs_per_step'))} |" if cuda else '')
                 + f" {r.get('host_syncs') or ''}{(' ERROR: ' + r['error']) if r.get('error') else ''} |")
    if ratios:
        L += ['', '| arch | ratio | value | target | met |', '|---|---|---|---|---|']
        for q in ratios:
            t = q['target']; met = ''
            if t.startswith('<='): met = 'yes' if q['value'] <= float(t[2:]) else 'no'
            elif t.startswith('>'): met = 'yes' if q['value'] > float(t[1:]) else 'no'
            L.append(f"| {q['arch']} | {q['ratio']} | {q['value']:.3f} | {t} | {met} |")
    if pipeline:
        L += ['', 'Data pipeline alone (synthetic images rendered at that size, per-sample transforms, tokenizer; DeCLIP: 2 MOCOV2 '
              'views + EDA + MLM; CLIP: 1 standard view), samples per CPU-second of one process with 1 torch thread = one '
              'DataLoader worker:', '', '| pipeline | image size | samples/s per worker |', '|---|---|---|']
        for p in pipeline: L.append(f"| {p['method']} | {p['image_size']} | {p['samples_per_s_per_worker']:.1f} |")
    for n in notes: L.append(f"- {n}")
    return '\n'.join(L) + '\n'

HEADER = "# Performance\n\nGenerated blocks below are written by `benchmarks/step.py` (and `benchmarks/gpu.sh`).\n"

def write_block(md, begin, end, block, mode):
    "Replace the text between the `begin` and `end` markers of `md` with `block` (mode 'replace'), or append it."
    text = md.read_text() if md.exists() else HEADER
    wrapped = f"{begin}\n{block}{end}\n"
    if mode == 'replace' and begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + wrapped.rstrip('\n') + text[j:]
    else: text = text.rstrip('\n') + '\n\n' + wrapped
    md.write_text(text)

def write_reports(args, meta, results, pipeline, ratios, notes, quiet=False):
    "Write this run's block into <report>.md and its rows into <report>.csv (called after each arch and at the end)."
    if args.report_mode == 'off': return
    section = args.section or meta['device_type']
    md, csv_path = Path(args.report + '.md'), Path(args.report + '.csv')
    md.parent.mkdir(parents=True, exist_ok=True)
    block = markdown_block(meta, results, pipeline, ratios, notes, section)
    tag = f"section={section}" + (f" run={meta['date']}" if args.report_mode == 'append' else '')
    write_block(md, f"<!-- BEGIN step.py {tag} -->", f"<!-- END step.py {tag} -->", block, 'replace')
    cols = ['section', 'date', 'device', 'device_type', 'torch', 'git_commit', 'threads', 'command', 'kind', 'arch', 'method', 'label',
            'compiled', 'sync_check', 'batch', 'image_size', 'context_length', 'precision', 'params_m', 'reps', 'step_s',
            'step_cpu_s', 'step_wall_s', 'samples_per_s', 'peak_mb', 'gflop_per_step', 'achieved_tflops', 'mfu', 'host_syncs',
            'cuda_syncs_per_step', 'first_step_s', 'error', 'ratio', 'value', 'target']
    old = []
    if csv_path.exists():
        with open(csv_path, newline='') as f: old = list(csv.DictReader(f))
        same_run = (lambda r: r.get('section') == section) if args.report_mode == 'replace' else \
                   (lambda r: r.get('section') == section and r.get('date') == meta['date'])
        old = [r for r in old if not same_run(r)]
    base = dict(section=section, **{k: meta[k] for k in ('date', 'device', 'device_type', 'torch', 'git_commit', 'threads', 'command')})
    rows = [dict(base, kind='step', **r) for r in results]
    rows += [dict(base, kind='pipeline', method=p['method'], image_size=p['image_size'], samples_per_s=p['samples_per_s_per_worker']) for p in pipeline]
    rows += [dict(base, kind='ratio', arch=q['arch'], ratio=q['ratio'], value=q['value'], target=q['target']) for q in ratios]
    with open(csv_path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction='ignore'); w.writeheader()
        for r in old + rows: w.writerow({k: r.get(k, '') for k in cols})
    if not quiet: print(f"\nwrote {md} (section {tag!r}) and {csv_path}")


def main(argv=None):
    if '--study' in (sys.argv[1:] if argv is None else argv):      # the study configuration's options: benchmarks/study_speed.py
        import study_speed
        return study_speed.main(argv)
    args = parse_args(argv)
    meta, results, pipeline, ratios, notes = run(args, progress=lambda *r: write_reports(args, *r, quiet=True))
    print('\n' + markdown_block(meta, results, pipeline, ratios, notes, args.section or meta['device_type']))
    write_reports(args, meta, results, pipeline, ratios, notes)
    return meta, results, pipeline, ratios

if __name__ == '__main__':
    main()
