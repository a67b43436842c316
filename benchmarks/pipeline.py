#!/usr/bin/env python
"""What one DataLoader worker delivers at 224 px, with the views finished in the worker or on the training device.

    python benchmarks/pipeline.py                 # CPU, ~3 min: writes the 'pipeline.py' block of reports/performance.md
    python benchmarks/pipeline.py --device cuda   # also times the device stage on the GPU (benchmarks/gpu.sh)
    python benchmarks/pipeline.py --end_to_end --device cuda --workers 14   # real training steps fed by real loaders

The benchmark writes its own JPEGs (no download): 1/f-noise colour pictures, whose detail, and so whose decoding cost,
is like a photograph's, not like a flat drawing's. Two sets:
  - web: 500 x 375, quality 90 (a typical web photo: COCO's and CC3M's common size);
  - 256: the same pictures pre-resized to a shorter side of 256 at preparation, quality 95 (img2dataset's
    `resize_mode=keep_ratio, image_size=256` recipe for CC3M / CC12M / LAION, and its default quality);
  - large: 1600 x 1200, quality 90 (an original photo, as raw LAION / YFCC downloads often are), where the
    reduced-scale decode (`draft_jpeg`) applies; also measured with it off (`lazy_jpeg=false`: a full decode).
For each set, each method (DeCLIP: two MoCo v2 views + EDA + MLM; CLIP: one STANDARD view) and each `view_device`
(and, for DeCLIP, `decode_device='device'`: the worker reads the file and its header only),
one process with one torch thread (= one DataLoader worker) reads a CSV of the JPEGs through the library's own
reader and `TrainData` (file read, decode, views, tokens) and the CPU seconds per sample are counted
(`time.process_time`). The configurations run in interleaved rounds and the median round is kept, so the ratios
compare measurements made side by side. Decoding alone is timed the same way. The device stage (`finish_batch` on
a batch of 256 DeCLIP samples: the views from uint8 crops, and decode + crops + views from 256-px JPEG bytes) is timed
on the CPU, and on CUDA with `--device cuda`.

`--end_to_end` trains instead (`declip-train`, DeCLIP ViT-B/32 + text-base at 224 px, bf16, on the 256-px JPEGs,
`--workers` DataLoader workers) once with `--view_device worker` and once with `device`, and reports the steps'
samples/s (median of the logged intervals after the first two) and the share of the run spent waiting for data.

Workers per GPU = the target rate (4,000 DeCLIP samples/s, a ViT-B/32 DeCLIP step on an H100/H200 at 30-40 % MFU,
reports/performance.md) / one worker's rate, rounded up; one worker is one CPU core.
"""
import argparse, csv, datetime, json, math, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
from step import git_commit, write_block          # one copy of these helpers

WORDS = ('a photo of a {a} {n} {v} near the {p}', 'the {a} {n} {v} in a {p}', 'close-up of {a} {n} on the {p}')
ADJ, NOUN = ('red', 'small', 'old', 'bright', 'wooden', 'happy', 'dark', 'green'), ('dog', 'house', 'car', 'tree', 'woman', 'boat', 'bird', 'chair')
VERB, PLACE = ('standing', 'sleeping', 'parked', 'waiting', 'sitting'), ('beach', 'street', 'garden', 'river', 'kitchen', 'field')


def pink_noise(rng, h, w):
    "A colour picture with a 1/f spectrum (like a photograph's), uint8 [h, w, 3]."
    import numpy as np
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None]
    amp = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    chans = []
    for _ in range(3):
        spec = amp * np.exp(2j * np.pi * rng.random(amp.shape))
        x = np.fft.irfft2(spec, s=(h, w)); x = (x - x.mean()) / (x.std() + 1e-9)
        chans.append(x)
    mix = rng.normal(size=(3, 3)) * 0.35 + np.eye(3)                  # correlated channels, as in photographs
    img = np.tensordot(np.stack(chans, -1), mix, axes=([2], [1]))
    return np.clip(128 + 45 * img, 0, 255).astype(np.uint8)


def write_jpegs(folder: Path, n: int, n_large: int, seed: int = 0) -> dict:
    "n pictures as web JPEGs (500x375, q90) and pre-resized ones (shorter side 256, q95), n_large at 1600x1200 (q90); a CSV for each."
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = {}
    for name in ('web', '256', 'large'): (folder / name).mkdir(parents=True, exist_ok=True)
    rows = {'web': [], '256': [], 'large': []}
    for i in range(n):
        im = Image.fromarray(pink_noise(rng, 375, 500))
        cap = WORDS[i % 3].format(a=ADJ[rng.integers(8)], n=NOUN[rng.integers(8)], v=VERB[rng.integers(5)], p=PLACE[rng.integers(6)])
        im.save(folder / 'web' / f'{i}.jpg', quality=90); rows['web'].append((folder / 'web' / f'{i}.jpg', cap))
        im.resize((341, 256), Image.BICUBIC, reducing_gap=3.0).save(folder / '256' / f'{i}.jpg', quality=95)
        rows['256'].append((folder / '256' / f'{i}.jpg', cap))
        if i < n_large:
            Image.fromarray(pink_noise(rng, 1200, 1600)).save(folder / 'large' / f'{i}.jpg', quality=90)
            rows['large'].append((folder / 'large' / f'{i}.jpg', cap))
    for name, r in rows.items():
        with open(folder / f'{name}.csv', 'w', newline='') as f:
            w = csv.writer(f); w.writerow(['filepath', 'title']); w.writerows(r)
        sizes = [os.path.getsize(p) for p, _ in r]
        out[name] = dict(csv=str(folder / f'{name}.csv'), kb=statistics.mean(sizes) / 1024 if sizes else 0.)
    return out


def worker_rate(data, n: int, start: int) -> float:
    "Samples per CPU-second of this process over `n` samples of `data` (a TrainData or a reader)."
    t = time.process_time()
    for i in range(start, start + n): data[(0, i % len(data.reader))] if hasattr(data, 'reader') else data[i % len(data)]
    return n / (time.process_time() - t)


def measure(args, sets: dict) -> dict:
    import torch
    from declip.pipeline import SamplePipeline, TrainData, open_train_data, collate, finish_batch
    from declip.models import create_model
    torch.set_num_threads(1)
    configs, rates = [], {}
    for s in sets:
        reader = open_train_data(f"csv:{sets[s]['csv']}:lazy_jpeg=false")      # decodes in full, at once
        configs.append(((s, 'decode', '-'), reader))
        lazy = open_train_data(f"csv:{sets[s]['csv']}")                          # the training default: lazy, draft where it applies
        for method in args.methods if s != 'large' else ['declip']:
            req = create_model(method).data_requirements()
            variants = [('worker', lazy), ('device', lazy)] + ([('device, full decode', reader)] if s == 'large' else []) \
                       + ([('device + JPEG decode on the device', lazy)] if method == 'declip' else [])
            for vd, r in variants:
                pipe = SamplePipeline(req['image_views'], args.image_size, text_aug=req['text_aug'], mlm=req['mlm'],
                                      view_device=vd.split(',')[0].split(' ')[0], decode_device='device' if 'decode on' in vd else 'worker')
                data = TrainData(r, pipe)
                data[(0, 0)]                                      # warm-up: tokenizer, WordNet
                configs.append(((s, method, vd), data))
    for r in range(args.rounds):                                  # interleaved: every configuration once per round
        for key, data in configs:
            n = args.samples if key[0] != 'large' else max(10, args.samples // 5)
            rates.setdefault(key, []).append(worker_rate(data, n, 1 + r * n))
        print(f'round {r + 1}/{args.rounds}: ' + ', '.join(f'{"/".join(k)} {v[-1]:.0f}' for k, v in rates.items()), flush=True)
    per_worker = {k: statistics.median(v) for k, v in rates.items()}
    # the device stage: a batch of DeCLIP samples, uint8 crops -> finished views
    req = create_model('declip').data_requirements()
    data = TrainData(open_train_data(f"csv:{sets['web']['csv']}"), SamplePipeline(req['image_views'], args.image_size, view_device='device'))
    batch = collate([data[(0, i % len(data))] for i in range(args.stage_batch)])
    enc = TrainData(open_train_data(f"csv:{sets['256']['csv']}"), SamplePipeline(req['image_views'], args.image_size, view_device='device',
                                                                            decode_device='device'))
    encoded = collate([enc[(0, i % len(enc))] for i in range(args.stage_batch)])
    stage = {}
    for (dev_name, what), b0 in [(k, b) for d in ['cpu'] + (['cuda'] if args.device == 'cuda' else [])
                                 for k, b in (((d, 'views'), batch), ((d, 'decode + crops + views (256-px JPEGs)'), encoded))]:
        threads = 1 if dev_name == 'cpu' else torch.get_num_threads()
        dev = torch.device(dev_name)
        b = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b0.items()}
        if dev_name == 'cpu': torch.set_num_threads(args.stage_threads)
        finish_batch(b)                                           # warm-up
        times = []
        for _ in range(args.stage_reps):
            if dev.type == 'cuda': torch.cuda.synchronize(dev)
            t = time.perf_counter(); out = finish_batch(b)
            if dev.type == 'cuda': torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        torch.set_num_threads(1)
        ms = 1e3 * statistics.median(times)
        stage[f'{dev_name}: {what}'] = dict(ms_per_batch=ms, samples_per_s=args.stage_batch / (ms / 1e3),
                               threads=args.stage_threads if dev_name == 'cpu' else None,
                               device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu')
    # views with the JPEGs decoded on the device against the worker's (Pillow's), in levels of 255
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255
    diffs = {}
    for sname in ('web', '256'):
        rd = open_train_data(f"csv:{sets[sname]['csv']}")
        worker = SamplePipeline(req['image_views'], args.image_size, view_device='worker')
        ondev = SamplePipeline(req['image_views'], args.image_size, view_device='device', decode_device='device')
        n = min(len(rd), args.compare)
        d = (finish_batch(collate([ondev(i, 0, *rd[i]) for i in range(n)]))['images']
             - collate([worker(i, 0, *rd[i]) for i in range(n)])['images']).abs() * std
        diffs[sname] = dict(samples=n, mean=float(d.mean()), over_1=float((d > 1.01).float().mean()), max=float(d.max()))
    uint8_mb = batch['images'].numel() / 2**20
    jpeg_mb = sum(j['data'].numel() for j in encoded.get('jpeg') or [] if j is not None) / 2**20
    return dict(per_worker=per_worker, rounds=rates, stage=stage, decode_diff=diffs, batch_images_mib=dict(uint8=uint8_mb, float32=4 * uint8_mb, jpeg_256=jpeg_mb))


def report(args, sets, res) -> str:
    pw, target = res['per_worker'], args.target
    L = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, git {git_commit()}, torch threads 1 per worker, "
         f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), image size {args.image_size}, "
         f"{args.samples} samples x {args.rounds} interleaved rounds per configuration (median round).",
         f"Command: `python benchmarks/pipeline.py {' '.join(sys.argv[1:])}`".rstrip(),
         '', f"JPEGs written by the benchmark (1/f-noise colour pictures): web 500x375 q90 ({sets['web']['kb']:.0f} KB), "
         f"pre-resized 256 (341x256) q95 ({sets['256']['kb']:.0f} KB), large 1600x1200 q90 ({sets['large']['kb']:.0f} KB; "
         f"{args.samples // 5} samples a round). Views finished in the worker or on the device; JPEGs opened lazily and "
         "decoded at a reduced scale where every crop allows it (the training default), except 'decode only' and 'full decode'.", '',
         '| JPEGs | method | views finished in | samples/s per worker | ms per sample | speed-up | workers for 4,000/s |',
         '|---|---|---|---|---|---|---|']
    for s in ('web', '256', 'large'):
        d = pw[(s, 'decode', '-')]
        L.append(f"| {s} | (decode only) | - | {d:.0f} | {1e3 / d:.2f} | | |")
        for m in args.methods if s != 'large' else ['declip']:
            w = pw[(s, m, 'worker')]
            for vd in ['worker', 'device'] + (['device, full decode'] if s == 'large' else []) + \
                      (['device + JPEG decode on the device'] if m == 'declip' else []):
                v = pw[(s, m, vd)]
                L.append(f"| {s} | {m} | {vd} | {v:.0f} | {1e3 / v:.2f} | {'' if vd == 'worker' else f'{v / w:.2f}x'} | "
                         f"{math.ceil(target / v) if m == 'declip' else ''} |")
    L += ['', '| device stage (`finish_batch`, DeCLIP, 2 views) | batch | ms per batch | samples/s |', '|---|---|---|---|']
    for k, v in res['stage'].items():
        dev_name, what = k.split(': ', 1)
        where = f"{dev_name} ({v['threads']} thread{'s' * (v['threads'] != 1)}): {what}" if v['threads'] else k
        L.append(f"| {where} ({v['device']}) | {args.stage_batch} | {v['ms_per_batch']:.1f} | {v['samples_per_s']:.0f} |")
    up = pw[('web', 'declip', 'device')] / pw[('web', 'declip', 'worker')]
    need = math.ceil(target / pw[('256', 'declip', 'device')])
    need_dec = math.ceil(target / pw[('256', 'declip', 'device + JPEG decode on the device')])
    L += ['', '| DeCLIP views, JPEGs decoded on the device vs in the worker (CPU) | samples | mean abs. difference, levels of 255 | share > 1 level | max |',
          '|---|---|---|---|---|']
    L += [f"| {k} | {v['samples']} | {v['mean']:.3f} | {v['over_1']:.2%} | {v['max']:.0f} |" for k, v in res['decode_diff'].items()]
    L += ['', f"Images of a batch of {args.stage_batch} DeCLIP samples over the bus: {res['batch_images_mib']['uint8']:.0f} MiB as uint8, "
              f"{res['batch_images_mib']['float32']:.0f} MiB as float32; with the JPEGs decoded on the device, {res['batch_images_mib']['jpeg_256']:.0f} MiB "
              "of 256-px JPEG bytes.", '',
          '| target | measured | met |', '|---|---|---|',
          f"| DeCLIP per-worker speed-up on web JPEGs >= 2.5x | {up:.2f}x | {'yes' if up >= 2.5 else 'no'} |",
          f"| DeCLIP workers per GPU at {target:,.0f} samples/s on pre-resized 256-px JPEGs <= 8: views on the device | {need} | {'yes' if need <= 8 else 'no'} |",
          f"| the same, JPEGs also decoded on the device (the GPU's decode time not counted here: see the device stage) | {need_dec} | {'yes' if need_dec <= 8 else 'no'} |"]
    return '\n'.join(L) + '\n'


def end_to_end(args) -> str:
    "Train with real loaders, views in the worker and on the device: samples/s and the share of time waiting for data."
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_jpegs(Path(tmp), args.e2e_images, 0)
        for vd in ('worker', 'device'):
            out = Path(tmp) / f'run-{vd}'
            cmd = ['declip-train', '--method', 'declip', '--train_data', f"csv:{sets['256']['csv']}", '--eval_data', '',
                   '--workers', str(args.workers), '--view_device', vd, '--device', args.device, '--progress', 'false',
                   '--output_dir', str(out), '--log_every', str(args.e2e_log_every)] + args.e2e_args.split()
            t = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode: raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            recs = [json.loads(l) for l in open(out / 'metrics.jsonl') if l.strip()]
            train = [r for r in recs if r['type'] == 'train']
            summ = json.loads((out / 'summary.json').read_text())
            rate = statistics.median([r['samples_per_s'] for r in train[2:]] or [summ['samples_per_s']])
            wait = train[-1]['data_wait_s'] / max(summ['wall_time_s'], 1e-9) if train else float('nan')
            rows.append((vd, rate, wait, summ['steps'], time.time() - t))
    L = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, git {git_commit()}, device {args.device}, "
         f"{os.cpu_count()} cores, {args.workers} DataLoader workers, {args.e2e_images} JPEGs of 341x256 (q95).",
         f"Command: `python benchmarks/pipeline.py {' '.join(sys.argv[1:])}`; each run: `declip-train --method declip "
         f"--train_data csv:... --workers {args.workers} --view_device V --device {args.device} {args.e2e_args}`", '',
         '| views finished in | steps | samples/s (median interval after the first two) | share of the run waiting for data | run s |',
         '|---|---|---|---|---|']
    L += [f"| {vd} | {n} | {r:.0f} | {w:.0%} | {d:.0f} |" for vd, r, w, n, d in rows]
    return '\n'.join(L) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='cuda: also time the device stage on the GPU')
    p.add_argument('--images', type=int, default=200, help='JPEGs written per set')
    p.add_argument('--large_images', type=int, default=40, help='1600x1200 JPEGs written')
    p.add_argument('--samples', type=int, default=200, help='samples per configuration per round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--image_size', type=int, default=224)
    p.add_argument('--methods', default='declip,clip')
    p.add_argument('--target', type=float, default=4000., help='DeCLIP samples/s one GPU consumes')
    p.add_argument('--stage_batch', type=int, default=256)
    p.add_argument('--compare', type=int, default=32, help='samples per set compared: JPEGs decoded on the device vs in the worker')
    p.add_argument('--stage_reps', type=int, default=3)
    p.add_argument('--stage_threads', type=int, default=1, help='torch threads for the CPU device stage')
    p.add_argument('--report', default=str(ROOT / 'reports' / 'performance.md'), help="'' = print only")
    p.add_argument('--end_to_end', action='store_true', help='train with real loaders (views in the worker / on the device) instead')
    p.add_argument('--workers', type=int, default=max(1, (os.cpu_count() or 2) - 2), help='end to end: DataLoader workers')
    p.add_argument('--e2e_images', type=int, default=2048, help='end to end: 256-px JPEGs written')
    p.add_argument('--e2e_log_every', type=int, default=5)
    p.add_argument('--e2e_args', default='--image_encoder vit-b32 --text_encoder text-base --image_size 224 --context_length 77 '
                                         '--batch_size 256 --precision bf16 --max_steps 40',
                   help='end to end: the rest of the declip-train command')
    args = p.parse_args(argv)
    args.methods = args.methods.split(',')
    if args.end_to_end:
        block = end_to_end(args); print(block)
        if args.report:
            section = f"end-to-end device={args.device}"
            write_block(Path(args.report), f"<!-- BEGIN pipeline.py {section} -->", f"<!-- END pipeline.py {section} -->",
                        "### Training steps fed by real loaders: views in the worker or on the device (`benchmarks/pipeline.py --end_to_end`)\n\n" + block, 'replace')
        return
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_jpegs(Path(tmp), args.images, args.large_images)
        res = measure(args, sets)
    block = report(args, sets, res)
    print(block)
    if args.report:
        section = f"device={args.device}"
        write_block(Path(args.report), f"<!-- BEGIN pipeline.py {section} -->", f"<!-- END pipeline.py {section} -->",
                    "### One worker's rate at 224 px: views finished in the worker or on the device (`benchmarks/pipeline.py`)\n\n" + block, 'replace')
        out = Path(args.report).with_name('pipeline.json')
        out.write_text(json.dumps(dict(args=vars(args), decode_diff=res['decode_diff'], per_worker={'/'.join(k): v for k, v in res['per_worker'].items()},
                                       rounds={'/'.join(k): v for k, v in res['rounds'].items()}, stage=res['stage']), indent=2))
        print(f"wrote {args.report} (block 'pipeline.py {section}') and {out}")


if __name__ == '__main__':
    main()
