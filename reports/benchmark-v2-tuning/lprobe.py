import sys, torch, numpy as np
from declip.inference import load_checkpoint
import declip.synthetic as S
torch.set_num_threads(2)
model, tok, pre = load_checkpoint(sys.argv[1]); model.eval()
def feats(seed, n):
    ev = S.synthetic_eval_sets(seed=seed, n_per_class=n, n_retrieval=1)
    out = {}
    for task in ('shape', 'colour'):
        ds = ev[task]
        x = torch.stack([pre(ds[i][0]) for i in range(len(ds))])
        with torch.no_grad(): f = model.encode_image(x)
        out[task] = (f, torch.tensor(ds.labels))
    return out
tr, te = feats(1, 60), feats(0, 30)
for task in ('shape', 'colour'):
    (xtr, ytr), (xte, yte) = tr[task], te[task]
    y = torch.nn.functional.one_hot(ytr).float(); d = xtr.shape[1]
    w = torch.linalg.solve(xtr.T @ xtr + 0.1 * torch.eye(d), xtr.T @ y)
    print(task, 'linear probe top1', round(((xte @ w).argmax(1) == yte).float().mean().item(), 3))
