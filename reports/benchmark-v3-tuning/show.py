import json, sys
for d in sys.argv[1:]:
    rows = [json.loads(l) for l in open(f'{d}/metrics.jsonl')]
    tr = {r['step']: r for r in rows if r['type'] == 'train'}
    for r in rows:
        if r['type'] == 'eval':
            t = tr.get(r['step'], {})
            print(d, r['step'], 'loss %.2f ls %.1f' % (t.get('loss', float('nan')), t.get('logit_scale', 0)),
                  ' '.join(f"{k.split('/')[0]}={r[k]:.3f}" for k in r if k.endswith('top1') or k.endswith('image_to_text_R@1')))
