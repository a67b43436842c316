#!/usr/bin/env python
"""What a larger image tower costs a study run on this CPU (issue 35's scaling study): process CPU time of the
trainer's own step (`declip.step.train_step`, AdamW) per image tower, CLIP and DeCLIP, batch 64 at 64 px with
`text-tiny`, one torch thread. The towers' steps are interleaved (A B A B ...) and each ratio to the first tower
is the ratio of medians measured in this one run.

    python benchmarks/tower_cost.py                                   # vit-tiny vs vit-small, 5 timed steps each (~3 min)
    python benchmarks/tower_cost.py --towers vit-tiny vit-small resnet-tiny --steps 8
"""
import argparse, statistics, time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--towers', nargs='+', default=['vit-tiny', 'vit-small'])
    ap.add_argument('--methods', nargs='+', default=['clip', 'declip'])
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--steps', type=int, default=5, help='timed steps per configuration, after one untimed step')
    a = ap.parse_args()
    import torch
    from declip.models import create_model, random_batch
    from declip.step import train_step
    torch.set_num_threads(1)
    cases = {}
    for method in a.methods:
        for tower in a.towers:
            torch.manual_seed(0)
            m = create_model(method, image_encoder=tower, text_encoder='text-tiny')
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            b = random_batch(m, a.batch)
            train_step(m, [b], opt, 1e-4)                                  # untimed: AdamW allocates its state
            cases[method, tower] = (m, opt, b, sum(p.numel() for p in m.visual.parameters()))
    times = {k: [] for k in cases}
    for _ in range(a.steps):
        for k, (m, opt, b, _) in cases.items():
            t = time.process_time(); train_step(m, [b], opt, 1e-4); times[k].append(time.process_time() - t)
    print(f'CPU seconds per step (median of {a.steps}), batch {a.batch}, one thread; ratio to {a.towers[0]} in this run')
    for (method, tower), ts in times.items():
        med, ref = statistics.median(ts), statistics.median(times[method, a.towers[0]])
        print(f'{method:7s} {tower:12s} image tower {cases[method, tower][3] / 1e6:5.2f} M parameters  '
              f'{med:6.3f} s/step  x{med / ref:.2f}')


if __name__ == '__main__':
    main()
